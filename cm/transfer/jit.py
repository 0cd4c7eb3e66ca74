"""numba, set up before anything is compiled: where its cache of compiled code lives.

numba caches the compiled code on disk (``cache=True``) so a new process does
not compile again. When numba's default cache location (next to this
package) is not writable and ``NUMBA_CACHE_DIR`` is unset or unwritable, a
per-user directory under the system temp dir is used instead, seeded with a
copy of an unwritable ``NUMBA_CACHE_DIR`` (a cache compiled ahead for every
user). Import this module before ``numba`` anywhere in the mover
(``batchio`` does).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _choose_cache_dir() -> None:
    """Point numba at a writable cache directory before it is imported."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        if _writable_dir(Path(configured)):
            return
    elif _writable_dir(Path(__file__).resolve().parent / "__pycache__"):
        return
    fallback = _private_dir(Path(tempfile.gettempdir()) / f"cm-numba-cache-{os.getuid()}")
    if configured and Path(configured).is_dir() and not any(fallback.iterdir()):
        # a shared cache compiled ahead (the Docker image's) seeds this user's own copy
        import shutil

        try:
            shutil.copytree(configured, fallback, dirs_exist_ok=True)
        except (OSError, shutil.Error):
            pass  # an incomplete copy only means compiling what is missing
    os.environ["NUMBA_CACHE_DIR"] = str(fallback)


def _private_dir(path: Path) -> Path:
    """path if it is a directory of this user's that nobody else may write (made so if missing);
    otherwise a fresh private one. Another user could have made the shared name first and filled it
    with compiled code for us to load."""
    import stat

    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return Path(tempfile.mkdtemp(prefix="cm-numba-cache-"))
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
        return path
    return Path(tempfile.mkdtemp(prefix="cm-numba-cache-"))


_choose_cache_dir()
# numpy's BLAS threads would spin on our two or so cores for nothing: we never do linear algebra
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numba  # noqa: E402  (must follow the cache-dir choice)

if os.environ.get("NUMBA_CACHE_DIR") and numba.config.CACHE_DIR != os.environ["NUMBA_CACHE_DIR"]:
    # numba was imported before us with another cache dir; follow the env var.
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
