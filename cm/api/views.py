"""What a job view means, for every client (the commands and cm.Client): final or not, and its exit code.

Kept free of heavy imports: the commands load it on every start.
"""

from __future__ import annotations

from cm.states import FINAL_STATES

FINAL = frozenset(s.value for s in FINAL_STATES)


def is_final(view: dict) -> bool:
    return view["state"] in FINAL


def exit_code_of(view: dict) -> int:
    """What `--wait` exits with: 0 for a completed job, otherwise its exit code or 1."""
    if view["state"] == "COMPLETED":
        return 0
    code = view.get("exit_code") or 0
    return code if 0 < code < 256 else 1
