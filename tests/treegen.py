"""Trees like a site's, and a checker that compares a copy with its source the way an admin would.

``make_site_tree(top)`` writes hard links (inside one directory and across
directories), ``user.`` xattrs (``trusted.`` too in root's trees), POSIX
ACLs (access and default), a sparse file, a fifo, a unix socket, a name
that is not UTF-8, a deep path, a read-only directory, a symlink with its
own mtime and old directory mtimes. ``differences(src, dst)`` lists what a
peer still sees differ:
``rsync -naHAXS --checksum -i`` must list nothing, ``getfattr``/``getfacl``
dumps must match, and a sparse file must stay about as sparse.

Run as a script to make a tree: ``python tests/treegen.py DIR [--sparse-gib N]``.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

OLD = 1_500_000_000_000_000_000  # an mtime far from now: a copy that forgot it shows
SPARSE_DATA = 1 << 20  # bytes of data in the sparse file


def tools_missing() -> list[str]:
    """The peer tools the checker needs and this machine lacks."""
    return [t for t in ("rsync", "getfattr", "setfattr", "getfacl", "setfacl") if shutil.which(t) is None]


def user_xattrs_supported(directory: Path) -> bool:
    """Whether the file system of ``directory`` takes ``user.`` xattrs (tmpfs does since Linux 6.6)."""
    probe = directory / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def _file(path: Path, data: bytes, mode: int = 0o644, mtime: int = OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, ns=(mtime, mtime))
    return path


def make_sparse(path: Path, logical: int, data: int = SPARSE_DATA) -> Path:
    """A file of ``logical`` bytes holding ``data`` random bytes: half in the middle, half at the end."""
    half = max(data // 2, 1)
    with open(path, "wb") as f:
        f.truncate(logical)
        f.seek((logical // 2) & ~0xFFFF)
        f.write(os.urandom(half))
        f.seek(logical - half)
        f.write(os.urandom(half))
    os.utime(path, ns=(OLD, OLD))
    return path


def make_site_tree(top: Path, sparse_bytes: int = 256 << 20, xattrs: bool = True, acls: bool = True,
                   owner: tuple[int, int] | None = None, acl_user: str = "nobody", readonly: bool = True) -> Path:
    """Write the tree under ``top`` (created); ``owner`` (uid, gid) is given to every entry."""
    top.mkdir(parents=True, exist_ok=True)
    a, b = top / "a", top / "b"
    one = _file(a / "one.txt", b"one\n" * 1000)
    os.link(one, a / "one-again.txt")  # a hard link in the same directory
    b.mkdir()
    os.link(one, b / "one-elsewhere.txt")  # and in another
    big = _file(a / "big.bin", os.urandom(3 << 20))  # several chunks with small chunk sizes
    os.link(big, b / "big-link.bin")
    _file(a / "plain.txt", b"plain\n")
    _file(top / "x" / "y" / "z.txt", b"z\n", mode=0o600)
    if xattrs:
        os.setxattr(a / "plain.txt", "user.project", b"alpha")
        os.setxattr(a / "plain.txt", "user.binary", bytes(range(256)))
        os.setxattr(a, "user.dir", b"a directory's")
        os.setxattr(one, "user.linked", b"on every name of the inode")
        if owner is None and os.geteuid() == 0:  # root's tree: root's sync keeps trusted. too
            os.setxattr(a / "plain.txt", "trusted.site", b"root's only")
    if acls:
        acl = _file(top / "acl" / "shared.txt", b"shared\n", mode=0o640)
        subprocess.run(["setfacl", "-m", f"u:{acl_user}:r", str(acl)], check=True)
        inherit = top / "acl" / "inherit"
        inherit.mkdir()
        subprocess.run(["setfacl", "-d", "-m", f"u:{acl_user}:rx", str(inherit)], check=True)
        subprocess.run(["setfacl", "-m", f"u:{acl_user}:rx", str(inherit)], check=True)
        _file(inherit / "child.txt", b"child\n")  # takes the default ACL, as files made there do
        (inherit / "subdir").mkdir()
    make_sparse(top / "sparse.bin", sparse_bytes)
    special = top / "special"
    special.mkdir()
    os.mkfifo(special / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(special / "socket"))
    os.symlink("../a/one.txt", special / "link")
    os.utime(special / "link", ns=(OLD + 7, OLD + 7), follow_symlinks=False)
    os.utime(special / "fifo", ns=(OLD + 8, OLD + 8))
    weird = os.fsencode(top) + b"/caf\xe9-latin1.txt"
    with open(weird, "wb") as f:
        f.write(b"not utf-8\n")
    deep = top.joinpath(*[f"d{i}" for i in range(40)])
    _file(deep / "leaf.txt", b"deep\n")
    ro = top / "readonly"
    if readonly:
        _file(ro / "kept.txt", b"kept\n", mode=0o444)
    for dirpath, dirnames, filenames in os.walk(os.fsencode(top), topdown=False):
        if owner:
            for name in filenames + dirnames:
                os.chown(os.path.join(dirpath, name), *owner, follow_symlinks=False)
            os.chown(dirpath, *owner)
        os.utime(dirpath, ns=(OLD + 2, OLD + 2))  # after what is in it
    if readonly:
        ro.chmod(0o555)
        os.utime(ro, ns=(OLD + 3, OLD + 3))
    os.utime(top, ns=(OLD + 4, OLD + 4))
    return top


def _run(argv: list[str], cwd: Path) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True)
    if proc.returncode not in (0, 24):  # 24: files vanished (the probe files of other checks)
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode("utf-8", "surrogateescape")


def rsync_itemized(src: Path, dst: Path) -> list[str]:
    """What ``rsync -naHAXS --checksum -i`` would still change in ``dst`` (nothing, for a true copy)."""
    out = _run(["rsync", "-naHAXS", "--checksum", "--numeric-ids", "-i", f"{src}/", f"{dst}/"], src)
    return [line for line in out.splitlines() if line.strip()]


def _by_file(dump: str) -> str:
    """A dump's per-file blocks in name order (the tools list them in directory order, which copies change)."""
    return "\n\n".join(sorted(block.strip() for block in dump.split("\n\n") if block.strip()))


def xattr_dump(top: Path) -> str:
    """``getfattr -R -d -m -`` of the tree (physical walk, hex values), names relative to ``top``."""
    return _by_file(_run(["getfattr", "-R", "-P", "-h", "-d", "-m", "-", "-e", "hex", "."], top))


def acl_dump(top: Path) -> str:
    """``getfacl -R -P`` of the tree, names relative to ``top``."""
    return _by_file(_run(["getfacl", "-R", "-P", "-p", "."], top))


def blocks(path: Path) -> int:
    """Bytes a file occupies (st_blocks)."""
    return os.lstat(path).st_blocks * 512


def differences(src: Path, dst: Path, sparse: tuple[str, ...] = ("sparse.bin",)) -> list[str]:
    """What differs between the two trees, as a peer sees it; [] for a faithful copy."""
    found = [f"rsync: {line}" for line in rsync_itemized(src, dst)]
    for tool, dump in (("getfattr", xattr_dump), ("getfacl", acl_dump)):
        theirs, ours = dump(src).split("\n\n"), set(dump(dst).split("\n\n"))
        missing = [block.splitlines()[0] for block in theirs if block not in ours]
        if missing:
            found.append(f"{tool}: {len(missing)} differ, e.g. {missing[:3]}")
    for name in sparse:
        s, d = src / name, dst / name
        if s.exists() and d.exists() and blocks(d) > 2 * blocks(s) + (1 << 20):
            found.append(f"{name}: {blocks(d)} bytes allocated, the source {blocks(s)}")
    for dirpath, dirnames, filenames in os.walk(src):
        for name in filenames:
            p = Path(dirpath) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                q = dst / p.relative_to(src)
                if not q.exists() and not q.is_symlink() or stat.S_IFMT(os.lstat(q).st_mode) != stat.S_IFMT(mode):
                    found.append(f"{p.relative_to(src)}: not the same kind of file at the destination")
    return found


def chmod_writable(top: Path) -> None:
    """Make read-only directories writable again, so the tree can be removed."""
    for dirpath, _, _ in os.walk(top):
        os.chmod(dirpath, 0o755)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("top", type=Path)
    parser.add_argument("--sparse-gib", type=float, default=0.25)
    args = parser.parse_args()
    make_site_tree(args.top, int(args.sparse_gib * (1 << 30)))
