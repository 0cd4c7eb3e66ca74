"""What one sender process is asked to do: the JSON spec on its stdin, validated."""

from __future__ import annotations

import mmap
from dataclasses import MISSING, dataclass

from . import plan
from .tree import Excluder


class SpecError(ValueError):
    """The job description given to the sender is unusable."""


@dataclass(frozen=True)
class Spec:
    """What one sender process is asked to do (the JSON read from stdin)."""

    transfer_id: str
    token: str
    src_root: str
    src_path: str
    dst_host: str
    dst_port: int
    rank: int = 0
    nranks: int = 1
    policy: str = "round-robin"
    delete: bool = False
    dry_run: bool = False
    checksum: bool = False
    exclude: tuple[str, ...] = ()
    bwlimit: int | None = None
    streams: int = 4
    chunk_size: int = 64 << 20
    owners: bool = False  # also send owners (root's and operators' syncs keep them, like rsync -a as root)

    @classmethod
    def from_dict(cls, data: dict) -> "Spec":
        """Validate a decoded JSON object; raises ``SpecError`` naming the bad field."""
        if not isinstance(data, dict):
            raise SpecError("the spec must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"unknown spec fields: {', '.join(sorted(unknown))}")
        types = {
            "transfer_id": str, "token": str, "src_root": str, "src_path": str, "dst_host": str,
            "dst_port": int, "rank": int, "nranks": int, "policy": str, "delete": bool,
            "dry_run": bool, "checksum": bool, "streams": int, "chunk_size": int, "owners": bool,
        }
        args = {}
        for name, typ in types.items():
            if name not in data:
                if cls.__dataclass_fields__[name].default is MISSING:
                    raise SpecError(f"spec field {name!r} is missing")
                continue
            value = data[name]
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise SpecError(f"spec field {name!r} must be {typ.__name__}")
            args[name] = value
        exclude = data.get("exclude") or []
        if not isinstance(exclude, list) or not all(isinstance(p, str) and p for p in exclude):
            raise SpecError("spec field 'exclude' must be a list of patterns")
        args["exclude"] = tuple(exclude)
        bwlimit = data.get("bwlimit")
        if bwlimit is not None and (not isinstance(bwlimit, (int, float)) or isinstance(bwlimit, bool) or bwlimit <= 0):
            raise SpecError("spec field 'bwlimit' must be a positive number of bytes/s or null")
        args["bwlimit"] = None if bwlimit is None else int(bwlimit)
        spec = cls(**args)
        if not 0 <= spec.rank < spec.nranks:
            raise SpecError(f"rank {spec.rank} is not in 0..{spec.nranks - 1}")
        if spec.policy not in plan.POLICIES:
            raise SpecError(f"policy must be one of {', '.join(plan.POLICIES)}")
        if not 1 <= spec.streams <= 64:
            raise SpecError("streams must be 1..64")
        if spec.chunk_size <= 0 or spec.chunk_size % mmap.ALLOCATIONGRANULARITY:
            raise SpecError(f"chunk_size must be a positive multiple of {mmap.ALLOCATIONGRANULARITY}")
        if not 0 < spec.dst_port < 65536:
            raise SpecError("dst_port must be a TCP port")
        try:
            Excluder(spec.exclude)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        return spec
