"""Exclude patterns: rsync's meaning, matched by a linear-time NFA (no backtracking), capped in number and size."""

import random
import re

import pytest

from cm.transfer.excludes import MAX_PATTERN_LENGTH, MAX_PATTERNS, Excluder, check_patterns
from cm.transfer.tree import DIR, FILE, Entry


def _regex(glob: str) -> str:
    """The meaning, spelled as a (backtracking) regular expression: the reference for small cases only."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append({"*": "[^/]*", "?": "[^/]"}.get(c) or ("[ab]" if glob.startswith("[ab]", i) else re.escape(c)))
        i += 4 if glob.startswith("[ab]", i) else 1
    return "".join(out)


def test_patterns_mean_what_rsync_says_on_thousands_of_random_cases():
    rnd = random.Random(7)
    for _ in range(20000):
        pat = "".join(rnd.choice(["a", "b", "/", "*", "?", "[ab]", "**"]) for _ in range(rnd.randint(1, 6)))
        if not pat.rstrip("/"):
            continue
        path = "/".join("".join(rnd.choice("ab") for _ in range(rnd.randint(1, 3))) for _ in range(rnd.randint(1, 4)))
        body = pat.rstrip("/")
        anchored, whole = body.startswith("/"), "/" in body
        rx = "^" + _regex(body.lstrip("/")) + "$" if anchored or not whole else "(?:^|/)" + _regex(body) + "$"
        want = bool(re.search(rx, path if whole or anchored else path.rsplit("/", 1)[-1]))
        assert Excluder([pat]).excluded(path, True) == want, (pat, path)


@pytest.mark.timeout(60)
def test_a_pattern_that_backtracks_in_a_regex_engine_is_matched_at_once():
    # as a regular expression this takes minutes per name (8 stars against 55 characters that almost match)
    ex = Excluder(["*a*a*a*a*a*a*a*a*b", "**a**a**a**a**a**a**a**b/", "/x/*a*a*a*a*a*a*a*a*b"])
    names = ["a" * 50 + f"{i:05d}" for i in range(200)]
    assert not any(ex.excluded(n, True) or ex.excluded("x/" + n, True) for n in names)
    assert ex.excluded("a" * 54 + "b", False)


def test_prune_leaves_out_what_is_in_excluded_directories():
    entries = [Entry("", DIR, 0, 0, 0o755), Entry("build", DIR, 0, 0, 0o755), Entry("build-notes", FILE, 1, 0, 0o644),
               Entry("build/x.o", FILE, 1, 0, 0o644), Entry("build/sub", DIR, 0, 0, 0o755),
               Entry("build/sub/y", FILE, 1, 0, 0o644), Entry("src", DIR, 0, 0, 0o755),
               Entry("src/a.o", FILE, 1, 0, 0o644), Entry("src/a.c", FILE, 1, 0, 0o644)]
    kept = [e.path for e in Excluder(["build/", "*.o"]).prune(entries)]
    assert kept == ["", "build-notes", "src", "src/a.c"]


def test_too_many_or_too_long_patterns_are_refused_saying_why():
    with pytest.raises(ValueError, match=f"at most {MAX_PATTERNS}"):
        check_patterns(["*.o"] * (MAX_PATTERNS + 1))
    with pytest.raises(ValueError, match="characters"):
        check_patterns(["x" * (MAX_PATTERN_LENGTH + 1)])
    with pytest.raises(ValueError, match="bad exclude pattern"):
        check_patterns(["/"])
    assert check_patterns(["*.o", "x" * MAX_PATTERN_LENGTH]) == ["*.o", "x" * MAX_PATTERN_LENGTH]
