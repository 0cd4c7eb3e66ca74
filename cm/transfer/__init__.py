"""The data mover: tree walk and diff, chunk plan, TCP sender/receiver, checksums, numba batch I/O.

Modules, by concept: ``paths`` (confinement), ``tree`` (walks), ``excludes`` (linear-time patterns),
``plan`` (work items, rank assignment), ``diff`` (what the destination
lacks), ``checksum`` (XXH3), ``jit`` (numba's cache), ``batchio``
(small files read and written by compiled code), ``frames`` (what each frame says: one msgspec
Struct per request and answer), ``wire`` (frames: the only place bytes meet
sockets), ``secure`` (the handshake on the run's key and the sealed records under ``wire``), ``partial`` (resume state of large files), ``destination``
(writes on the receiving side), ``receiver`` (``TransferServer`` and the
mover process), ``control`` (the node daemon → mover lines), ``spec`` (what
a sender is asked to do), ``sender`` (one rank's run) with ``connection``,
``decide``, ``streams``, ``source``, ``throttle`` and ``stats``, ``send``
(the ``python -m cm.transfer.send`` process) and its ``exitcodes``,
``rdma``.
"""
