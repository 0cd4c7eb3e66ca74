"""`make mutants`: break the code on purpose, one small breakage at a time, and check a test notices.

Each entry of scripts/mutants.toml has an id, the rows of docs/RELIABILITY.md and docs/SECURITY.md it
attacks (`rows`, each as `DOC: key`, see `doc_rows`), the claim it breaks, a file, an exact text in it (which
must occur exactly once, so the list fails loudly when the code moves on), what to put in its place, and
the tests that claim the row. Before anything runs, every row of both documents must be named by at least
one entry, and every name must be a row: a new row without a breakage fails `make mutants`. The checkout
is copied once to a scratch directory (its virtual environment pointed at the copy); each breakage is
applied there, the tests run, and the file is put back. A breakage that every test survives is a row no
test proves: the run fails and names it.

    python scripts/mutants.py [--only TEXT] [--list] [--rows] [--baseline] [--scratch DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "scripts" / "mutants.toml"
DOCS = [ROOT / "docs" / "RELIABILITY.md", ROOT / "docs" / "SECURITY.md"]
FIELDS = {"id", "rows", "claim", "file", "find", "replace", "tests"}


def doc_rows(path: Path) -> list[str]:
    """The claims of one document, each as `STEM: key`: the first cell of every row of a table that has a
    `test` column, and every top-level bullet (its bold lead if it has one, else its text up to the first
    `.`, `;`, `:` or `(`). Tables without a test column (who is trusted) state the model, not a promise."""
    keys, header = [], None
    for line in path.read_text().splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: ") and "test" in header:
                keys.append(f"{path.stem}: {cells[0]}")
            continue
        header = None
        if line.startswith("- "):
            text = line[2:].strip()
            bold = re.match(r"\*\*(.+?)\*\*", text)
            keys.append(f"{path.stem}: {bold.group(1) if bold else re.split(r'[.;:(]', text)[0].strip()}")
    return keys


def check_rows(mutants: list[dict], strict: bool = True) -> dict[str, list[str]]:
    """Each row of the documents with the ids of the entries that name it. What does not match is printed,
    and ends the run when strict (a run of the whole list; `--only` runs a part and only warns)."""
    table = {key: [] for doc in DOCS for key in doc_rows(doc)}
    unknown = []
    for m in mutants:
        for key in m["rows"]:
            if key in table:
                table[key].append(m["id"])
            else:
                unknown.append(f"{m['id']}: {key}")
    bare = [key for key, ids in table.items() if not ids]
    problems = ([f"{LIST.name} names a row the documents do not have: {u}" for u in unknown]
                + [f"no breakage in {LIST.name} names this row: {key}" for key in bare])
    if problems and strict:
        raise SystemExit("\n".join(problems))
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return table


def load(path: Path) -> list[dict]:
    mutants = tomllib.loads(path.read_text())["mutant"]
    for m in mutants:
        missing = FIELDS - m.keys()
        if missing:
            raise SystemExit(f"{path}: an entry misses {sorted(missing)}: {m}")
    ids = [m["id"] for m in mutants]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise SystemExit(f"{path}: ids used twice: {twice}")
    return mutants


def scratch_copy(dest: Path) -> Path:
    """A copy of the checkout whose virtual environment runs the copy's code, not this checkout's."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(ROOT), str(dest)], check=True)
    venv = dest / ".venv"
    for path in [*venv.glob("bin/*"), *venv.glob("lib/python*/site-packages/*.pth")]:
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if str(ROOT).encode() in data and b"\0" not in data:
                path.write_bytes(data.replace(str(ROOT).encode(), str(dest).encode()))
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import cm; print(cm.__file__)"], cwd="/",
                           capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(dest) + "/"):
        raise SystemExit(f"the scratch copy's python imports cm from {where}, not from {dest}")
    return dest


def forget_bytecode(source: Path) -> None:
    """Drop the compiled module, so the next run compiles what the file holds now (mtime and size can match)."""
    for pyc in (source.parent / "__pycache__").glob(f"{source.stem}.*.pyc"):
        pyc.unlink()


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[int, str]:
    cmd = [str(copy / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "--timeout", str(int(timeout)), *tests]
    try:
        done = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout * len(tests) + 60)
    except subprocess.TimeoutExpired as exc:
        return -1, f"timed out after {exc.timeout:.0f} s"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("E ") or " passed" in line
             or " failed" in line or "error" in line.lower()]
    return done.returncode, "\n".join(lines[:6])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list-file", type=Path, default=LIST)
    parser.add_argument("--only", action="append",
                        help="run only entries whose id, claim, rows or file contain this text (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the entries and stop")
    parser.add_argument("--rows", action="store_true", help="print each row of the documents with its entries and stop")
    parser.add_argument("--scratch", type=Path, default=Path(os.environ.get("CM_MUTANTS_DIR", "/tmp/cm-mutants")))
    parser.add_argument("--timeout", type=float, default=300, help="seconds per test")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    parser.add_argument("--baseline", action="store_true",
                        help="first run every named test on the unbroken copy (each must pass)")
    args = parser.parse_args()
    mutants = load(args.list_file)
    table = check_rows(mutants, strict=not args.only)
    if args.rows:
        for key, ids in table.items():
            print(f"{key}\n    {' '.join(ids)}")
        return 0
    if args.only:
        mutants = [m for m in mutants
                   if any(only in text for only in args.only for text in [m["id"], m["claim"], m["file"], *m["rows"]])]
    if args.list:
        for m in mutants:
            print(f"{m['id']}: {m['claim']}\n    {m['file']}: {m.get('why', '')}\n    {' '.join(m['tests'])}")
        return 0
    for m in mutants:  # every text must still be there exactly once before anything runs
        count = (ROOT / m["file"]).read_text().count(m["find"])
        if count != 1:
            raise SystemExit(f"{m['file']}: the text of '{m['id']}' occurs {count} times (must be once):\n{m['find']}")
    copy = scratch_copy(args.scratch / "checkout")
    survived, broken = [], []
    try:
        if args.baseline:
            for test in dict.fromkeys(t for m in mutants for t in m["tests"]):
                rc, summary = run_tests(copy, [test], args.timeout)
                print(f"baseline {'ok' if rc == 0 else 'FAILS'}: {test}", flush=True)
                if rc != 0:
                    print("    " + summary.replace("\n", "\n    "), flush=True)
                    return 1
        for number, m in enumerate(mutants, 1):
            source = copy / m["file"]
            original = source.read_text()
            source.write_text(original.replace(m["find"], m["replace"], 1))
            forget_bytecode(source)
            t0 = time.monotonic()
            try:
                rc, summary = run_tests(copy, m["tests"], args.timeout)
            finally:
                source.write_text(original)
                forget_bytecode(source)
            took = time.monotonic() - t0
            if rc in (0, 5):  # passed, or no test collected: nothing noticed the breakage
                verdict = "SURVIVED" if rc == 0 else "NO TEST"
                survived.append(m)
            elif rc in (2, 3, 4):  # interrupted, internal error, usage error: the list is wrong
                verdict = f"ERROR (pytest exit {rc})"
                broken.append(m)
            else:
                verdict = "killed"
            print(f"[{number}/{len(mutants)}] {verdict:8} {took:6.0f} s  {m['id']}: {m['claim']}  ({m['file']})", flush=True)
            if verdict != "killed" or os.environ.get("CM_MUTANTS_VERBOSE"):
                print("    " + summary.replace("\n", "\n    "), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.scratch / "checkout", ignore_errors=True)
    print(f"mutants: {len(mutants) - len(survived) - len(broken)} killed, {len(survived)} survived, "
          f"{len(broken)} errors, of {len(mutants)}")
    for m in survived + broken:
        print(f"  not proven: {m['id']}: {m['claim']} ({m['file']}: {m.get('why', '')}); rows: {'; '.join(m['rows'])}")
    return 1 if survived or broken else 0


if __name__ == "__main__":
    sys.exit(main())
