"""rsync-style exclude patterns, matched in time linear in the name: no pattern can hold a walk up.

Only senders match them (the user's own process): the receiver lists all
it has and the sender leaves out of that list what is excluded
(``Excluder.prune``), so no user's pattern runs in the mover every user
shares. Their number and length are capped (``check_patterns``, also at
submit).
"""

from __future__ import annotations

from typing import Iterable

from .tree import DIR, Entry

MAX_PATTERNS = 64  # exclude patterns one sync may give
MAX_PATTERN_LENGTH = 1024  # characters in one pattern


def check_patterns(patterns: Iterable[str]) -> list[str]:
    """The patterns, if there are not too many nor any too long; raises ``ValueError`` saying which."""
    patterns = list(patterns)
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} --exclude patterns, not {len(patterns)}")
    for pat in patterns:
        if not isinstance(pat, str) or not pat or not pat.rstrip("/"):
            raise ValueError(f"bad exclude pattern {pat!r}")
        if len(pat) > MAX_PATTERN_LENGTH:
            raise ValueError(f"exclude pattern of {len(pat)} characters (at most {MAX_PATTERN_LENGTH}): {pat[:40]!r}...")
    return patterns


class _Glob:
    """One glob matched in linear time: a bit-parallel NFA over its tokens, no backtracking.

    Tokens: ``*`` (any run of characters but ``/``), ``**`` (any run),
    ``?`` (one character but ``/``), ``[...]`` (one of a set, ``!`` or ``^``
    negates; never ``/``) and literal characters. Bit ``i`` of the state is
    set when the first ``i`` tokens can have matched what was read; each
    character costs a few integer operations, whatever the pattern, so no
    pattern and name can take more than length × tokens steps. ``restart``:
    the pattern may also begin after any ``/`` (rsync's unanchored
    patterns with a ``/``).
    """

    def __init__(self, glob: str, restart: bool = False):
        self.restart = restart
        self._tests: list = []  # per token: (is_star, test(char) -> bool)
        i = 0
        while i < len(glob):
            c = glob[i]
            if c == "*":
                j = i
                while j < len(glob) and glob[j] == "*":
                    j += 1
                crosses = j - i >= 2
                if self._tests and self._tests[-1][0]:  # a star after a star: one star, the wider
                    crosses = crosses or self._tests[-1][2]
                    self._tests.pop()
                self._tests.append((True, (lambda ch: True) if crosses else (lambda ch: ch != "/"), crosses))
                i = j
                continue
            if c == "?":
                self._tests.append((False, lambda ch: ch != "/", False))
            elif c == "[" and (k := _class_end(glob, i)) > 0:
                self._tests.append((False, _char_class(glob[i + 1:k]), False))
                i = k
            else:
                self._tests.append((False, c.__eq__, False))
            i += 1
        self._final = 1 << len(self._tests)
        self._eps = sum(1 << n for n, (star, _, _) in enumerate(self._tests) if star)
        self._start = self._close(1)
        self._masks: dict[str, tuple[int, int]] = {}

    def _close(self, state: int) -> int:
        return state | (state & self._eps) << 1  # stars never follow stars: one step closes

    def _masks_of(self, ch: str) -> tuple[int, int]:
        one = loop = 0
        for n, (star, test, _) in enumerate(self._tests):
            if test(ch):
                if star:
                    loop |= 1 << n
                else:
                    one |= 1 << n
        if len(self._masks) < 4096:  # names hold few distinct characters; a flood of others is only slower
            self._masks[ch] = (one, loop)
        return one, loop

    def match(self, text: str) -> bool:
        """Whether the whole of ``text`` matches (or, with ``restart``, the part after one of its ``/``)."""
        state = start = self._start
        masks, eps, restart = self._masks, self._eps, self.restart
        for ch in text:
            one, loop = masks.get(ch) or self._masks_of(ch)
            state = (state & one) << 1 | (state & loop)
            state |= (state & eps) << 1
            if restart:
                if ch == "/":
                    state |= start
            elif not state:
                return False
        return bool(state & self._final)


def _class_end(glob: str, i: int) -> int:
    """Index of the ``]`` closing the class that opens at ``i`` (a ``]`` right after ``[`` or ``[!`` is in it), or -1."""
    j = i + 1
    if glob[j:j + 1] in ("!", "^"):
        j += 1
    if glob[j:j + 1] == "]":
        j += 1
    return glob.find("]", j)


def _char_class(body: str):
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    ranges, i = [], 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            ranges.append((body[i], body[i + 2]))
            i += 3
        else:
            ranges.append((body[i], body[i]))
            i += 1

    def test(ch: str) -> bool:
        return ch != "/" and any(lo <= ch <= hi for lo, hi in ranges) != negate

    return test


def _matcher(body: str, restart: bool, name_only: bool):
    """The fastest exact test for one pattern body: string compares for plain names and ``*.ext``, else a ``_Glob``."""
    wild = set(body) & set("*?[")
    if not wild:
        return (lambda s: s == body or s.endswith("/" + body)) if restart else body.__eq__
    if name_only and wild == {"*"} and body.count("*") == 1:
        head, _, tail = body.partition("*")  # no "/" in a name: "*" and "**" are alike
        n = len(head) + len(tail)
        return lambda s: len(s) >= n and s.startswith(head) and s.endswith(tail)
    return _Glob(body, restart).match


class Excluder:
    """rsync-style exclude patterns, matched in time linear in the name (``_Glob``).

    A pattern without ``/`` matches a name at any depth; a pattern with a
    ``/`` matches the end of the path (a leading ``/`` anchors it to the
    top of the tree); a trailing ``/`` matches directories only; ``*`` and
    ``?`` stop at ``/``, ``**`` does not. Excluded directories are not
    entered, and excluded destination files are not deleted. Only senders
    match them (the user's own process): the receiver lists all it has and
    the sender leaves out what is excluded (``prune``).
    """

    def __init__(self, patterns: Iterable[str] = ()):
        self.patterns = check_patterns(patterns)
        self._rules: list[tuple] = []
        for pat in self.patterns:
            dir_only = pat.endswith("/")
            body = pat.rstrip("/")
            anchored = body.startswith("/")
            whole_path = "/" in body
            body = body.lstrip("/")
            self._rules.append((_matcher(body, whole_path and not anchored, not (whole_path or anchored)), dir_only,
                                whole_path or anchored))

    def __bool__(self) -> bool:
        return bool(self._rules)

    def excluded(self, path: str, is_dir: bool) -> bool:
        """Whether ``path`` (relative, ``/``-joined) is excluded."""
        name = path.rsplit("/", 1)[-1]
        for match, dir_only, whole in self._rules:
            if dir_only and not is_dir:
                continue
            if match(path if whole else name):
                return True
        return False

    def prune(self, entries: list[Entry]) -> list[Entry]:
        """``entries`` (sorted, as walks give them) without the excluded ones and what is in excluded directories."""
        if not self._rules:
            return entries
        out, gone = [], set()
        for e in entries:
            if e.path and (e.path.rpartition("/")[0] in gone or self.excluded(e.path, e.kind == DIR)):
                if e.kind == DIR:
                    gone.add(e.path)
                continue
            out.append(e)
        return out
