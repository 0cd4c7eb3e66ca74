"""What the destination needs, given the source entries and the destination's manifest.

Pure functions over ``Entry`` lists and dicts; the sender feeds them what it
walked and what the receiver listed, and turns the answers into requests.
"""

from __future__ import annotations

from .partial import partial_names
from .plan import is_small
from .tree import DIR, FILE, LINK, SPECIAL, TEMP_PREFIX, Entry, is_temp_name

SPECIAL_KINDS = frozenset(SPECIAL.values())


def file_matches(src: Entry, dst: Entry | None, compare_mtime: bool = True) -> bool:
    """Whether ``dst`` already holds ``src``'s data by size (and mtime unless comparing content)."""
    if dst is None or dst.kind != FILE or dst.size != src.size:
        return False
    return not compare_mtime or dst.mtime_ns == src.mtime_ns


def dirs_to_make(src: list[Entry], dst: dict[str, Entry]) -> list[Entry]:
    """Source directories that are not directories at the destination, parents first."""
    out = []
    for e in src:
        if e.kind == DIR:
            d = dst.get(e.path)
            if d is None or d.kind != DIR:
                out.append(e)
    return out


def links_to_make(src: list[Entry], dst: dict[str, Entry]) -> list[Entry]:
    """Source symlinks missing at the destination or differing in target or mtime."""
    out = []
    for e in src:
        if e.kind != LINK:
            continue
        d = dst.get(e.path)
        if d is None or d.kind != LINK or d.target != e.target or d.mtime_ns != e.mtime_ns:
            out.append(e)
    return out


def specials_to_make(src: list[Entry], dst: dict[str, Entry]) -> list[Entry]:
    """Source fifos, sockets and devices missing at the destination or differing from it."""
    out = []
    for e in src:
        if e.kind in SPECIAL_KINDS:
            d = dst.get(e.path)
            if d is None or (d.kind, d.size, d.mode, d.mtime_ns) != (e.kind, e.size, e.mode, e.mtime_ns):
                out.append(e)
    return out


def deletions(src: dict[str, Entry], dst: list[Entry]) -> tuple[list[str], list[str]]:
    """(top-most destination paths to remove, every path that goes with them).

    A destination entry goes when the source has no entry of that name, or
    when one of the two is a directory and the other is not (the new one
    cannot take its place otherwise). ``dst`` must be sorted by path.
    """
    tops: list[str] = []
    gone: list[str] = []
    cut = None
    for d in dst:
        if not d.path:
            continue
        if cut is not None and d.path.startswith(cut):
            gone.append(d.path)
            continue
        s = src.get(d.path)
        if s is None or (s.kind != d.kind and DIR in (s.kind, d.kind)):
            tops.append(d.path)
            gone.append(d.path)
            cut = d.path + "/"
    return tops, gone


def dir_meta(src: list[Entry], dst: dict[str, Entry], touched: set[str]) -> list[Entry]:
    """Source directories whose mode/mtime must be (re)set: differing ones and those we changed."""
    out = []
    for e in src:
        if e.kind != DIR:
            continue
        d = dst.get(e.path)
        if e.path in touched or d is None or d.kind != DIR or d.mode != e.mode or d.mtime_ns != e.mtime_ns:
            out.append(e)
    return out


def parent(path: str) -> str:
    """The tree-relative parent of ``path`` (``""`` for the top)."""
    return path.rsplit("/", 1)[0] if "/" in path else ""


def split_temps(dst: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    """(the destination's own entries, the mover's temporary files among them) of a manifest."""
    own, temps = [], []
    for d in dst:
        path = d.path
        (temps if TEMP_PREFIX in path and d.kind == FILE and is_temp_name(path.rpartition("/")[2]) else own).append(d)
    return own, temps


def orphan_temps(src: list[Entry], dst: dict[str, Entry], temps: list[Entry], chunk_size: int,
                 checksum: bool) -> list[str]:
    """The partially received files (``.part`` and sidecar) no run of this sync would resume: those of
    another version of a file, of a file no longer in the source, or of one already in place."""
    wanted = set()
    for e in src:
        if e.kind == FILE and not is_small(e.size, chunk_size) and (checksum or not file_matches(e, dst.get(e.path))):
            folder, _, name = e.path.rpartition("/")
            for temp in partial_names(name, e.size, e.mtime_ns, chunk_size):
                wanted.add(f"{folder}/{temp}" if folder else temp)
    return [t.path for t in temps if t.path.endswith((".part", ".ok")) and t.path not in wanted]
