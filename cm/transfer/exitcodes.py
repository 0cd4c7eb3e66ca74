"""Exit codes of a sender process (``python -m cm.transfer.send``): defined here once.

The node passes a sender's code on as its share's exit code; the head
reads ``TRANSIENT`` to run a sync again. ``PARTIAL`` and ``VANISHED`` are
rsync's 23 and 24: the rest of the tree was copied, and the files that were
not are named in the job's error log. A share that ends ``VANISHED`` is
COMPLETED (the tree moved under the sync, which copied what was there);
one that ends ``PARTIAL`` is FAILED.
"""

OK = 0
FAILED = 1  # the transfer itself failed (nothing more could be done)
PARTIAL = 23  # the rest copied; some files could not be (permission, a name too long, ...)
VANISHED = 24  # the rest copied; some source files vanished or kept changing while they were read
BAD_SPEC = 2  # the spec on stdin does not fit its schema
TRANSIENT = 75  # EX_TEMPFAIL: the receiver or the network went away; worth another attempt
TERMINATED = 143  # 128 + SIGTERM: stopped (the receiver keeps what was verified, a re-run resumes)
