"""The network floor: one file over one loopback TCP stream, nothing else.

    python bench/tcp_copy.py recv DST      # prints its port, writes what arrives to DST, exits at EOF
    python bench/tcp_copy.py send PORT SRC  # sendfile(2) of SRC to 127.0.0.1:PORT
"""

import os
import socket
import sys

if sys.argv[1] == "recv":
    with socket.create_server(("127.0.0.1", 0)) as server:
        print(server.getsockname()[1], flush=True)
        conn, _ = server.accept()
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        with conn, open(sys.argv[2], "wb") as out:
            while n := conn.recv_into(buf):
                out.write(view[:n])
else:
    with socket.create_connection(("127.0.0.1", int(sys.argv[2]))) as conn, open(sys.argv[3], "rb") as src:
        conn.sendfile(src)
        conn.shutdown(socket.SHUT_WR)
    os._exit(0)
