"""What a job view means, for every client (the commands and cm.Client): final or not, and its exit code.

Kept free of heavy imports: the commands load it on every start.
"""

from __future__ import annotations

FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})  # cm.states.FINAL_STATES, without
# its enum (~3 ms of a command's start); tests/test_pure.py checks they agree


def is_final(view: dict) -> bool:
    return view["state"] in FINAL


def exit_code_of(view: dict) -> int:
    """What `--wait` exits with: a completed job's exit code (0, or a sync's 24: copied all but files
    that vanished or kept changing), otherwise its exit code or 1."""
    code = view.get("exit_code") or 0
    if view["state"] == "COMPLETED":
        return code if 0 < code < 256 else 0
    return code if 0 < code < 256 else 1
