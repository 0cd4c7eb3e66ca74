"""The head reads a sync's per-file report from the job's own directory (as the job's user): whatever the
user put there must neither hang the head's loop nor fill its memory."""

from __future__ import annotations

import os
import resource
import threading

from cm.transfer import report


def test_a_report_that_is_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / report.file_name(0)
    os.mkfifo(fifo)
    got: list = []

    def read() -> None:
        try:
            got.append(report.read(tmp_path, 1))
        except OSError as exc:
            got.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # let it go: a writer end opened
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert got and isinstance(got[0], OSError), f"the read blocked on a fifo: {got}"


def test_a_report_line_of_a_gigabyte_is_not_read_into_memory(tmp_path):
    path = tmp_path / report.file_name(0)
    with open(path, "wb") as f:
        f.write(b'{"action": "created", "path": "a"}\n')
        f.truncate(1 << 30)  # then a GiB of zeros without a newline (a sparse file: no room taken)
        f.seek(1 << 30)
        f.write(b'\n{"action": "created", "path": "b"}\n')
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child whose address space cannot hold that line
        os.close(r)
        with open("/proc/self/statm") as statm:
            size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20),) * 2)
        try:
            lines, _ = report.read(tmp_path, 1)
            os.write(w, repr([line["path"] for line in lines]).encode())
        except MemoryError:
            os.write(w, b"MemoryError")
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        said = f.read()
    os.waitpid(pid, 0)
    assert said == "['a', '?', 'b']"
