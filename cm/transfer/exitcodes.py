"""Exit codes of a sender process (``python -m cm.transfer.send``): defined here once.

The node passes a sender's code on as its share's exit code; the head
reads ``TRANSIENT`` to run a sync again.
"""

OK = 0
FAILED = 1  # the transfer failed, or some paths could not be copied
BAD_SPEC = 2  # the spec on stdin does not fit its schema
TRANSIENT = 75  # EX_TEMPFAIL: the receiver or the network went away; worth another attempt
TERMINATED = 143  # 128 + SIGTERM: stopped (the receiver keeps what was verified, a re-run resumes)
