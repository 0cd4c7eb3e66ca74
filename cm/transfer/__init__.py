"""The data mover: tree walk and diff, chunk plan, TCP sender/receiver, numba checksums.

Modules, by concept: ``paths`` (confinement), ``tree`` (walks, excludes),
``plan`` (work items, rank assignment), ``diff`` (what the destination
lacks), ``checksum`` (xxh64), ``wire`` (frames: the only place bytes meet
sockets), ``partial`` (resume state of large files), ``destination`` (writes
on the receiving side), ``receiver`` (``TransferServer``), ``sender`` and
``send`` (the ``python -m cm.transfer.send`` process), ``rdma``.
"""
