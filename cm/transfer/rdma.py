"""The RDMA transport: whether it can be used here.

The head calls ``missing()`` when a sync job asks for ``--transport rdma``
and refuses the job with the message it returns. The data path itself is
TCP for now (see ``wire``); a pyverbs path would replace ``Channel``'s
payload methods with RDMA writes into registered memory.
"""

from __future__ import annotations

import importlib


def missing() -> str | None:
    """None when pyverbs imports and at least one RDMA device exists, else what is missing."""
    try:
        device = importlib.import_module("pyverbs.device")
        errors = importlib.import_module("pyverbs.pyverbs_error")
    except ImportError:
        return "pyverbs is not installed (the rdma-core Python bindings, e.g. Debian's python3-pyverbs)"
    try:
        devices = device.get_device_list()
    except (errors.PyverbsError, OSError) as exc:
        return f"cannot list RDMA devices: {exc}"
    if not devices:
        return "no RDMA device found"
    return None
