"""The supervisor in `cmdaemon`: a part that dies is logged with its traceback and started again."""

from __future__ import annotations

import logging
import threading
import time

from cm.daemon import Part, Supervisor


def test_a_part_that_dies_is_logged_with_its_traceback_and_started_again(caplog):
    runs = []

    def flaky(stop: threading.Event) -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RuntimeError("a bug in the loop")
        stop.wait()  # the second run lives until the daemon stops

    part = Part("flaky", flaky)
    supervisor = Supervisor([part])
    with caplog.at_level(logging.INFO, logger="cm.daemon"):
        thread = threading.Thread(target=supervisor.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while len(runs) < 2:
            assert time.monotonic() < deadline, "the part was not started again"
            time.sleep(0.05)
        supervisor.stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert part.restarts == 1
    assert runs[1] - runs[0] >= 0.5  # after a back-off, not in a busy loop
    died = [r for r in caplog.records if r.getMessage() == "part flaky died"]
    assert died and died[0].exc_info and "a bug in the loop" in str(died[0].exc_info[1])  # with its traceback
    assert any("restarting part" in r.getMessage() for r in caplog.records)


def test_a_part_that_keeps_dying_is_started_again_ever_more_slowly():
    runs = []

    def broken(stop: threading.Event) -> None:
        runs.append(time.monotonic())
        raise RuntimeError("dies every time")

    supervisor = Supervisor([Part("broken", broken)])
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(runs) < 4:
        assert time.monotonic() < deadline, runs
        time.sleep(0.05)
    supervisor.stop.set()
    thread.join(timeout=60)
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert gaps[1] >= 1.0 and gaps[2] >= 2.0, gaps  # the back-off doubles: 0.5, 1, 2 s
