"""The compute daemon's loop: talk to the head, run what it says, report what ended.

Reports that matter (a job started, a job ended) wait in an outbox and are
resent until the head acknowledges them, so a head that was away when a job
ended still hears of it. Commands from the head are idempotent: a repeated
RunJob for a share already running here only repeats the JobStarted, one
for a share that ended repeats its JobEnded.

A node may hold several shares of one job (a sync's sender and receiver on
the same node, or ranks of a sync inside one partition), so every share is
keyed by (job, run, role, rank), and every heartbeat names the shares this
node runs and those whose end the head has not yet acknowledged: the head
checks them against the slots it gave out.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import msgspec
import zmq

from cm import __version__
from cm.config import Settings
from cm.logs import Sometimes, event
from cm.node import launch
from cm.node.intercom import IntercomSetupError, NodeIntercom
from cm.node.purge import Purge, Tracked
from cm.node.resources import measure
from cm.node.sync import WarmSenders, data_identity, sender_end, start_sender
from cm.outbox import Outbox
from cm.protocol import (
    ANY_RANK,
    ANY_ROLE,
    ANY_RUN,
    INTERCOM_TO_NODE,
    VERSION,
    Ack,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    JobEnded,
    JobStarted,
    KillJob,
    CommandShare,
    Message,
    NodeJob,
    OtherVersion,
    Progress,
    ProtocolError,
    RunJob,
    SyncDestination,
    SyncSource,
    ShareKey,
    SyncCounters,
    SyncStats,
    Welcome,
    decode,
    encode,
    new_id,
)
from cm.states import JobState

log = logging.getLogger("cm.node")
REMEMBER = 10000  # finished shares kept to answer repeated commands
RECONNECT_AFTER = 10.0  # seconds without a welcome before the link to the head is rebuilt


class NodeAgent:
    def __init__(self, settings: Settings, transfer=None, wakeup_fd: int | None = None):
        self.settings = settings
        self.name = settings.name
        self.transfer = transfer  # this node's Mover (cm.node.mover), if it receives syncs
        self.wakeup_fd = wakeup_fd
        self.incarnation = new_id()
        self.purge = Purge(settings.kill_grace)
        self.outbox = Outbox(settings.dispatch_retry)  # reports the head must acknowledge
        # shares that ended here, with how: a repeated RunJob for one is answered with its end again
        self.finished: collections.OrderedDict[ShareKey, tuple[JobState, int, str, float]] = collections.OrderedDict()
        self.receiving: dict[ShareKey, str] = {}  # dst share -> transfer id
        self.senders: dict[ShareKey, dict] = {}  # src share -> {proc, buffer, report, sent_at, err, run, rank}
        self.warm = WarmSenders(settings.warm_sender)
        self.welcomed = False
        self.registered = False  # welcomed once: a later hello (the head restarted) waits for nothing
        self.dealer: zmq.Socket | None = None
        self.refusals: zmq.Socket | None = None  # the dealer's monitor: handshakes the head refused
        self.connected_at = 0.0
        self.version_refusals = Sometimes()  # by the head's protocol version
        self.cpus, self.mem_mb = measure(settings.cpus, settings.mem_mb)
        self.state_file = Path(settings.run_dir) / f"{self.name}.jobs.json"
        self.intercom = NodeIntercom(settings, self.name, self.send)  # a job's processes <-> the head

    # --- loop ------------------------------------------------------------------

    def open(self) -> None:
        self._kill_orphans()
        self.warm.start()  # loading while the node connects; the first hello waits for it (run)
        self.connect()
        event(log, "node started", node=self.name, cpus=self.cpus, mem_mb=self.mem_mb,
              head=f"{self.settings.head_host}:{self.settings.head_port}")

    def connect(self) -> None:
        """A fresh DEALER to the head (also after a refused handshake, which libzmq does not retry)."""
        self._close_dealer()
        self.connected_at = time.monotonic()
        ctx = zmq.Context.instance()
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.identity = self.name.encode()
        self.dealer.reconnect_ivl = 100
        # a head back from a restart gives each node one heartbeat timeout to call back: a node backing off
        # must try again well within it (2 s of back-off against a 2-3 s timeout lost the race)
        self.dealer.reconnect_ivl_max = max(100, min(2000, int(self.settings.heartbeat_timeout * 250)))
        self.dealer.sndhwm = 10000
        if self.settings.curve:
            from cm.keys import secure_client

            secure_client(self.dealer, self.settings.run_dir, self.name)
            self.refusals = self.dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.dealer.connect(f"tcp://{self.settings.head_host}:{self.settings.head_port}")

    def run(self, stop: threading.Event) -> None:
        self.open()
        try:
            next_hello = next_beat = 0.0
            while not stop.is_set():
                now = time.monotonic()
                # The first hello waits until the zygote has loaded (bounded by WarmSenders.READY_WAIT):
                # a node the head sees is one whose first sync starts as fast as any other.
                held = not self.welcomed and not self.registered and not self.warm.settled()
                if held:
                    self.connected_at = now  # nothing asked of the head yet: no reason to reconnect
                elif not self.welcomed and now >= next_hello:
                    self._check_refused()
                    if now - self.connected_at > RECONNECT_AFTER:
                        event(log, "no welcome from the head; reconnecting", logging.WARNING)
                        self.connect()
                    self.send(self._hello())
                    next_hello = now + min(1.0, self.settings.heartbeat_interval)
                if self.welcomed and now >= next_beat:
                    self.send(Heartbeat(node=self.name, running=self.running(), shares=self.shares(),
                                        ending=self.ending()))
                    next_beat = now + self.settings.heartbeat_interval
                self._resend(now)
                self.poll(0.1)
                self._reap(time.monotonic())
        finally:
            self.close()

    def close(self) -> None:
        now = time.monotonic()
        self.purge.stop_all(now)
        deadline = now + self.settings.kill_grace + 1
        while self.purge.jobs and time.monotonic() < deadline:
            self.purge.tick(time.monotonic())
            time.sleep(0.05)
        self.warm.close()
        self.intercom.close_all()
        self._close_dealer()

    def _close_dealer(self) -> None:
        if self.refusals is not None:
            if self.dealer is not None:
                self.dealer.disable_monitor()
            self.refusals.close(0)
            self.refusals = None
        if self.dealer is not None:
            self.dealer.close(0)
            self.dealer = None

    def _check_refused(self) -> None:
        """Say so when the head refused this node's key (the node keeps trying: it may be authorised later)."""
        if self.refusals is None or not self.refusals.poll(0):
            return
        from zmq.utils.monitor import recv_monitor_message

        from cm.keys import REFUSED_HINT

        while self.refusals.poll(0):
            recv_monitor_message(self.refusals)
        event(log, f"the head refused this node's CurveZMQ key: {REFUSED_HINT} (node {self.name})",
              logging.ERROR, node=self.name)

    def poll(self, timeout: float) -> None:
        assert self.dealer is not None
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        if self.wakeup_fd is not None:
            poller.register(self.wakeup_fd, zmq.POLLIN)
        for s in self.senders.values():
            poller.register(s["proc"].stdout.fileno(), zmq.POLLIN)
        warm = self.warm.fileno()
        if warm is not None:
            poller.register(warm, zmq.POLLIN)  # the zygote is ready, or a forked sender ended
        for fd, events in self.intercom.fds():
            poller.register(fd, events)
        deadline = self.purge.next_deadline()
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        ready = dict(poller.poll(int(timeout * 1000)))
        if self.wakeup_fd is not None and self.wakeup_fd in ready:
            try:
                os.read(self.wakeup_fd, 4096)  # SIGCHLD arrived: _reap will look
            except BlockingIOError:
                pass
        if self.dealer in ready:
            for _ in range(1000):
                try:
                    payload = self.dealer.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    self.on_message(decode(payload))
                except OtherVersion as exc:
                    self._other_version(exc)
                except ProtocolError as exc:
                    event(log, "bad message from head", logging.WARNING, error=str(exc))
        for share, s in list(self.senders.items()):
            if s["proc"].stdout.fileno() in ready:
                self._read_progress(share, s)
        if warm is not None and warm in ready:
            self.warm.collect()
        self.intercom.on_ready(ready)
        self.intercom.tick(time.monotonic())

    def _other_version(self, exc: OtherVersion) -> None:
        """The head speaks another protocol: its refusal (which names both versions) is logged as it is."""
        head = exc.envelope
        if not self.version_refusals.due(head.v):
            return
        said = f": {head.message}" if head.t == "error" and head.message else f" ({exc})"
        event(log, f"the head (protocol {head.v}) refused this node (cm {__version__}, protocol {VERSION}){said}",
              logging.ERROR, node=self.name, head_protocol=head.v)

    # --- messages --------------------------------------------------------------

    def send(self, msg: Message) -> None:
        assert self.dealer is not None
        try:
            self.dealer.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass  # head unreachable and queue full; reliable messages are resent

    def report(self, msg: Message) -> None:
        """Send a message that must reach the head: kept until acknowledged."""
        self.outbox.put("", msg, time.monotonic())
        self.send(msg)

    def _resend(self, now: float) -> None:
        for msg_id, _, msg in self.outbox.due(now):
            self.outbox.sent(msg_id, now)
            self.send(msg)

    def _hello(self) -> Hello:
        host = self.settings.transfer_host or self.name
        port = self.transfer.port if self.transfer is not None else 0
        return Hello(node=self.name, partition=self.settings.partition, cpus=self.cpus, mem_mb=self.mem_mb,
                     version=__version__, running=self.running(), transfer_addr=f"{host}:{port}",
                     data_root=str(Path(self.settings.data_root).resolve()), incarnation=self.incarnation,
                     shares=self.shares(), ending=self.ending())

    def running(self) -> list[int]:
        return sorted({share.job_id for share in self.shares()})

    def shares(self) -> list[ShareKey]:
        """Every share of a job running here (processes or a registered receiver)."""
        return sorted({*self.purge.jobs, *self.receiving})

    def ending(self) -> list[ShareKey]:
        """Shares whose end is reported but not yet acknowledged: the head must not think them lost."""
        return sorted({m.share for m in self.outbox.messages() if isinstance(m, JobEnded)})

    def on_message(self, msg: Message) -> None:
        if isinstance(msg, Welcome):
            self.welcomed = self.registered = True
            for job_id in msg.kill:
                self.stop(ShareKey(job_id, ANY_RUN, ANY_ROLE, ANY_RANK), JobState.CANCELLED, "the head does not know this job")
            for m in list(self.outbox.messages()):
                self.send(m)
            self.intercom.welcomed()
        elif isinstance(msg, Ack):
            self.outbox.ack(msg.ref)
        elif isinstance(msg, Error):
            if msg.code == ErrorCode.UNKNOWN_NODE:
                self.welcomed = False  # the head does not know this node (it restarted): say hello again
            else:
                event(log, "head reported an error", logging.WARNING, ref=msg.ref, error=msg.message,
                      code=msg.code.value)
        elif isinstance(msg, RunJob):
            if self.run_job(msg.job_id, msg.spec):
                self.send(Ack(ref=msg.id))  # unacknowledged, the head sends it again
        elif isinstance(msg, INTERCOM_TO_NODE):
            self.intercom.on_head(msg)
        elif isinstance(msg, KillJob):
            self.send(Ack(ref=msg.id))
            try:
                state = JobState(msg.state)
            except ValueError:
                state = JobState.CANCELLED
            self.stop(msg.share, state, msg.reason or f"stopped by the head ({state.value})")
        else:
            event(log, "unexpected message from head", logging.WARNING, type=msg.TYPE)

    # --- jobs ------------------------------------------------------------------

    def _report_end(self, share: ShareKey, state: JobState, exit_code: int, reason: str, at: float = 0.0) -> None:
        """Report a share's end (``at``: when it ended, if not now)."""
        at = at or time.time()
        self.finished[share] = (state, exit_code, reason, at)
        while len(self.finished) > REMEMBER:
            self.finished.popitem(last=False)
        self.report(JobEnded(job_id=share.job_id, node=self.name, run=share.run, state=state.value,
                             exit_code=exit_code, reason=reason, role=share.role, rank=share.rank, at=at))

    def run_job(self, job_id: int, spec: NodeJob) -> bool:
        """Start this node's share of a job (once per run, role and rank). False: not now, ask again later."""
        share = ShareKey(job_id, spec.run, spec.role, spec.rank)
        run = share.run
        if share in self.finished:
            # over already; say so again (the head may have lost the first report in an outage)
            state, exit_code, reason, at = self.finished[share]
            if not any(isinstance(m, JobEnded) and m.share == share for m in self.outbox.messages()):
                self._report_end(share, state, exit_code, reason, at)
            return True
        if share in self.purge.jobs or share in self.receiving:
            self.report(JobStarted(job_id=job_id, node=self.name, run=run, role=share.role, rank=share.rank))
            return True
        here = [s for s in (*self.purge.jobs, *self.receiving) if s.job_id == job_id and s.run != run]
        if any(s.run > run for s in here):
            self._report_end(share, JobState.FAILED, 1, f"run {run} arrived after a newer run of the job")
            return True
        if here:
            # an earlier run of this job is still here (e.g. requeued while this node was cut off):
            # the new run starts only once the old one is reaped, so the two never overlap
            for old in here:
                self._stop_share(old, JobState.NODE_FAIL, "superseded by a newer run")
            return False
        try:
            if isinstance(spec, CommandShare):
                procs = self._start_command(share, spec)
                self.purge.add(Tracked(job_id, run, procs, time.monotonic() + spec.time_limit,
                                       role=share.role, rank=share.rank))
            else:
                self._start_sync(share, spec)
        except _NotNow as exc:
            event(log, "job not started yet", job=job_id, role=share.role, rank=share.rank, reason=str(exc))
            return False
        except (launch.LaunchError, KeyError, TypeError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, launch.LaunchError) else f"bad job spec: {exc!r}"
            event(log, "job failed to start", logging.WARNING, job=job_id, role=share.role, rank=share.rank,
                  reason=reason)
            self._report_end(share, JobState.FAILED, 127, reason)
            return True
        self.report(JobStarted(job_id=job_id, node=self.name, run=run, role=share.role, rank=share.rank))
        self._save_state()
        event(log, "job started", job=job_id, run=run, kind=spec.kind, role=share.role, rank=share.rank)
        return True

    def _start_command(self, share: ShareKey, spec: CommandShare) -> list[subprocess.Popen]:
        """The share's processes, each with CM_INTERCOM naming the share's intercom socket."""
        try:
            path = self.intercom.open(share, spec.uid, spec.gid, spec.procs)
        except IntercomSetupError as exc:
            raise launch.LaunchError(str(exc)) from None
        try:
            procs = launch.start(spec, self.name, share.job_id, extra_env={"CM_INTERCOM": path})
        except BaseException:
            self.intercom.close(share)
            raise
        self.intercom.attach(share, procs)
        return procs

    def _start_sync(self, share: ShareKey, spec: SyncSource | SyncDestination) -> None:
        job_id = share.job_id
        if isinstance(spec, SyncDestination):
            if self.transfer is None:
                raise launch.LaunchError(f"{self.name} has no mover running")
            from cm.node.mover import MoverError

            transfer = spec.transfer
            who = data_identity(transfer, launch.job_identity(spec))
            try:
                self.transfer.register(transfer.transfer_id, transfer.token, Path(self.settings.data_root),
                                       transfer.dst_path, who, keep_owners=transfer.owners)
            except MoverError as exc:
                if not self.transfer.running:  # being started again: the head sends the RunJob again
                    raise _NotNow(str(exc)) from None
                raise launch.LaunchError(str(exc)) from None
            self.receiving[share] = transfer.transfer_id
            return
        proc, err = start_sender(spec, self.name, job_id, str(Path(self.settings.data_root).resolve()), self.warm)
        self.senders[share] = {"proc": proc, "buffer": b"", "report": None, "sent_at": 0.0, "err": err,
                               "run": spec.run, "rank": share.rank, "stats": {}}
        self.purge.add(Tracked(job_id, spec.run, [proc], time.monotonic() + spec.time_limit,
                               role=share.role, rank=share.rank, on_end=lambda: self._close_sender(share)))

    def stop(self, pattern: ShareKey, state: JobState, reason: str) -> None:
        """Stop the shares here that ``pattern`` matches (ShareKey.matches: its wildcards)."""
        for share in [*self.purge.jobs, *self.receiving]:
            if pattern.matches(share):
                self._stop_share(share, state, reason)

    def _stop_share(self, share: ShareKey, state: JobState, reason: str) -> None:
        if share in self.receiving:
            transfer_id = self.receiving.pop(share)
            if self.transfer is not None:
                self.transfer.unregister(transfer_id)
            self._report_end(share, state, 0, reason)  # a receiver is gone at once: confirm it
            return
        self.purge.stop(share, state, reason, time.monotonic())

    def _reap(self, now: float) -> None:
        ended = self.purge.tick(now)
        for f in ended:
            self.intercom.close(f.share)
            reason = f.reason
            sender = self.senders.pop(f.share, None)
            state = f.state
            if sender is not None:
                state, reason = sender_end(f.state, f.exit_code, reason, sender["err"])
            self._report_end(f.share, state, f.exit_code, reason)
            event(log, "job ended", job=f.job_id, run=f.run, role=f.role, rank=f.rank, state=f.state.value,
                  exit_code=f.exit_code)
        if ended:
            self._save_state()
        if not self.senders:
            self.warm.start()  # at the start, and again if it died: between transfers, never slowing one

    # --- sync progress -----------------------------------------------------------

    def _read_progress(self, share: ShareKey, s: dict) -> None:
        try:
            chunk = os.read(s["proc"].stdout.fileno(), 1 << 16)
        except (BlockingIOError, OSError):
            return
        lines = (s["buffer"] + chunk).split(b"\n")
        s["buffer"] = lines.pop()
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if isinstance(report, dict):
                if report.get("done"):
                    s["stats"] = report
                else:
                    s["report"] = report
        now = time.monotonic()
        if s["report"] and (now - s["sent_at"] >= 0.5 or s["stats"]):
            s["sent_at"] = now
            self._send_progress(share, s)

    def _send_progress(self, share: ShareKey, s: dict) -> None:
        r = s["report"] or {}
        try:
            msg = Progress(job_id=share.job_id, node=self.name, run=s["run"], rank=s["rank"],
                           counters=msgspec.convert(r, SyncCounters) if r else NO_COUNTERS,
                           stats=_final_counters(s["stats"]) if s["stats"] else None)
        except msgspec.ValidationError:
            return
        if s["stats"]:
            self.report(msg)  # the final counters must arrive
        else:
            self.send(msg)

    def _close_sender(self, share: ShareKey) -> None:
        s = self.senders.get(share)
        if s is None:
            return
        self._read_progress(share, s)
        if s["stats"] and not s["report"]:
            s["report"] = {}
        if s["stats"]:
            self._send_progress(share, s)
        s["proc"].stdout.close()

    # --- surviving our own restart -----------------------------------------------

    def _save_state(self) -> None:
        """Process groups of running jobs, so a restarted daemon can stop orphans."""
        groups = {".".join(map(str, j.share)): [p.pid for p in j.procs] for j in self.purge.jobs.values()}
        tmp = self.state_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(groups))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            event(log, "cannot save node state", logging.WARNING, error=str(exc))

    def _kill_orphans(self) -> None:
        import signal

        try:
            groups = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return
        for job_id, pids in groups.items():
            for pid in pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                    event(log, "killed orphan of a previous daemon", job=job_id, pgid=pid)
                except (ProcessLookupError, PermissionError):
                    pass
        self.state_file.unlink(missing_ok=True)


NO_COUNTERS = SyncCounters(bytes_done=0, bytes_total=0, files_done=0, files_total=0, rate=0.0)  # no line yet


class _NotNow(Exception):
    """A share cannot start yet for a reason that passes (this node's mover is being started again)."""


def _final_counters(report: dict) -> SyncStats:
    """A sender's last line (cm.transfer.stats.Stats.report) as the counters the head sums."""
    return msgspec.convert({k: v for k, v in report.items() if k in SyncStats.__struct_fields__}, SyncStats)

