"""``python -m cm.transfer.send``: run one rank of a sync job.

Reads the job's JSON spec (see ``sender.Spec``) from stdin, prints progress
as one JSON object per line on stdout (a few per second), then a final line
with ``"done": true`` and the counts. Exit status 0 on success; otherwise a
one-line message on stderr and a non-zero status: 1 when the transfer
failed or some paths could not be copied, 2 for a bad spec, 75 when the
receiver or the network went away (worth another attempt), 143 on SIGTERM.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys

from .sender import Sender, TransferError
from .spec import Spec, SpecError

EXIT_FAILED = 1
EXIT_BAD_SPEC = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: the receiver or the network went away; worth another attempt
EXIT_TERMINATED = 143


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _die(code: int, message: str) -> None:
    sys.stderr.write(f"cm.transfer.send: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def _on_sigterm(signum, frame) -> None:
    # Stop at once: the receiver keeps every chunk verified so far, so a re-run resumes.
    _die(EXIT_TERMINATED, "terminated")


def main() -> int:
    """Entry point; returns the process exit status."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        spec = Spec.from_dict(json.loads(sys.stdin.read()))
    except json.JSONDecodeError as exc:
        sys.stderr.write(f"cm.transfer.send: the spec on stdin is not JSON: {exc}\n")
        return EXIT_BAD_SPEC
    except SpecError as exc:
        sys.stderr.write(f"cm.transfer.send: {exc}\n")
        return EXIT_BAD_SPEC
    gc.disable()  # a short-lived process building many tuples: collections would only cost time
    sender = Sender(spec, _emit)
    try:
        report = sender.run()
    except TransferError as exc:
        sys.stderr.write(f"cm.transfer.send: {exc}\n")
        return EXIT_TRANSIENT if exc.transient else EXIT_FAILED
    _emit(report)
    errors = sender.stats.errors
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        sys.stderr.write(f"cm.transfer.send: {errors[0]}{more}\n")
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
