"""The intercom, as a job's processes use it: keys and commands shared by the processes of one job.

Inside a cm job, ``CM_INTERCOM`` names the node daemon's socket for the job::

    from cm import intercom
    intercom.put("config", text)               # every process of the job can get it
    text = intercom.get("config", timeout=30)  # waits for the first put when it is not there yet
    intercom.fence(timeout=60)                 # once every process of the job got here
    n = intercom.send("stop", to="node==computenode-2")   # how many processes it reached
    command, sender = intercom.recv(timeout=10)
    intercom.reply(sender, "stopped")

Conditions (``to``) select the job's processes by their path ``NODE/RANK``: ``""`` everyone but the
sender, ``rank==N``, ``node==NAME``, ``re:PATTERN`` (searched in ``NODE/RANK``). They are resolved
here, in the sender's process, from ``CM_NODELIST`` and ``CM_PROCS_PER_NODE``: a costly pattern
costs only its own process.

Errors: every failure raises an ``IntercomError`` subclass (``Timeout``, ``LimitExceeded``,
``JobEnded``, ``NotConnected``); no call waits forever unless asked to (``timeout=None`` waits
until the answer or the end of the job).

The frames on the socket (this module and cm.node.intercom) are msgspec Structs, msgpack-encoded,
each behind a 4-byte big-endian length.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from typing import Annotated, Callable, Union

import msgspec
from msgspec import Meta

from cm.framing import frame, unframe

SLACK = 5.0  # seconds a client waits beyond a call's own timeout for the node's answer
HEAD_WAIT = 120.0  # seconds a put, send or reply may wait for the node (which gives up on the head first)


# --- errors ------------------------------------------------------------------


class IntercomError(RuntimeError):
    """An intercom call failed; the message says why."""


class NotConnected(IntercomError):
    """Not inside a cm job, or the node's intercom cannot be reached."""


class JobEnded(IntercomError):
    """The job (this run of it) is over: the intercom is closed."""


class LimitExceeded(IntercomError):
    """A key, value, key count or command queue is over its limit (settings CM_INTERCOM_*)."""


class Timeout(IntercomError, TimeoutError):
    """The call's timeout passed first."""


# Failed.code is a cm.protocol.ErrorCode value; cm.protocol is not imported here (10 ms of a job process's
# start), so these are its values, checked against it by a unit test. Other codes raise IntercomError.
ERRORS: dict[str, type[IntercomError]] = {"timeout": Timeout, "limit": LimitExceeded, "ended": JobEnded}


# --- frames between a process and its node daemon ------------------------------


class Frame(msgspec.Struct, tag_field="t", forbid_unknown_fields=True, frozen=True):
    pass


Req = Annotated[int, Meta(ge=1)]  # a request's number on its connection (0: the node's greeting)
Key = Annotated[str, Meta(min_length=1)]


class Put(Frame, tag="put"):
    req: Req
    key: Key
    value: str


class Get(Frame, tag="get"):
    req: Req
    key: Key
    timeout: Union[float, None] = None


class Subscribe(Frame, tag="subscribe"):
    req: Req


class Fence(Frame, tag="fence"):
    req: Req
    timeout: Union[float, None] = None


class Send(Frame, tag="send"):
    req: Req
    command: str
    ranks: list[Annotated[int, Meta(ge=0)]]
    to: str = ""
    reply: bool = False


class Recv(Frame, tag="recv"):
    req: Req
    timeout: Union[float, None] = None
    replies: bool = False  # only replies (cmintercom send --wait-reply), leaving commands queued


Request = Union[Put, Get, Subscribe, Fence, Send, Recv]


class Done(Frame, tag="done"):
    req: int
    value: str = ""
    version: int = 0
    count: int = 0
    sender: str = ""


class Failed(Frame, tag="failed"):
    req: int
    code: str  # an ErrorCode value (see ERRORS)
    message: str


class Update(Frame, tag="update"):
    """A key was put (to subscribers)."""

    key: str
    value: str
    version: int


Answer = Union[Done, Failed, Update]

_encoder = msgspec.msgpack.Encoder()
_answers = msgspec.msgpack.Decoder(Answer)


FROM_NODE = (1 << 32) - 1  # the node daemon is trusted (its limits are settings a process does not read)


def pack(message: Frame) -> bytes:
    return frame(_encoder.encode(message))


def oversize(name: str, text: str, limit: int) -> str:
    """Why ``text`` is too long for an intercom key, value or command ("" when it is not): UTF-8 bytes.

    The limits are settings, so the node daemon and the head check them, not the frames' schemas.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    setting = "CM_INTERCOM_KEY_BYTES" if name == "key" else "CM_INTERCOM_VALUE_BYTES"
    return f"the {name} has {size} bytes, more than the limit of {limit} ({setting})" if size > limit else ""


# --- conditions --------------------------------------------------------------


def parse_condition(text: str) -> Callable[[str, int], bool]:
    """A condition as a test of (node, rank); raise ValueError for one that is not valid."""
    text = text.strip()
    if not text:
        return lambda node, rank: True
    if text.startswith("re:"):
        try:
            pattern = re.compile(text[3:])
        except re.error as exc:
            raise ValueError(f"bad pattern in condition {text!r}: {exc}") from None
        return lambda node, rank: pattern.search(f"{node}/{rank}") is not None
    name, op, value = text.partition("==")
    name, value = name.strip(), value.strip()
    if op and name == "rank":
        try:
            wanted = int(value)
        except ValueError:
            raise ValueError(f"condition {text!r}: rank must be a number") from None
        return lambda node, rank: rank == wanted
    if op and name == "node" and value:
        return lambda node, rank: node == value
    raise ValueError(f"condition {text!r} is not one of '', rank==N, node==NAME, re:PATTERN")


def job_layout(env=None) -> tuple[list[str], int, int]:
    """(nodes in rank order, processes per node, this process's rank) from a job's environment."""
    env = os.environ if env is None else env
    try:
        return (env["CM_NODELIST"].split(","), int(env["CM_PROCS_PER_NODE"]), int(env.get("CM_PROC_RANK", "-1")))
    except (KeyError, ValueError):
        raise NotConnected("not inside a cm job (CM_NODELIST and CM_PROCS_PER_NODE are not set)") from None


def select(condition: str, nodes: list[str], procs: int, me: int = -1) -> list[int]:
    """Ranks of the job that ``condition`` selects, the sender ``me`` left out."""
    test = parse_condition(condition)
    return [r for r in range(len(nodes) * procs) if r != me and test(nodes[r // procs], r)]


def rank_of(sender: str, nodes: list[str], procs: int) -> int:
    """The rank named by a sender path NODE/RANK of this job; ValueError if it is none of its processes."""
    node, _, rank = sender.rpartition("/")
    if not rank.isdigit() or int(rank) >= len(nodes) * procs or nodes[int(rank) // procs] != node:
        raise ValueError(f"{sender!r} is not a process of this job (NODE/RANK)")
    return int(rank)


# --- the connection ----------------------------------------------------------


class Intercom:
    """One connection to this job's intercom. Thread-safe: calls take turns."""

    def __init__(self, path: str | None = None):
        path = path or os.environ.get("CM_INTERCOM", "")
        if not path:
            raise NotConnected("CM_INTERCOM is not set: not inside a cm job (or its node has no intercom)")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise NotConnected(f"cannot reach the intercom at {path}: {exc.strerror or exc}") from None
        self.path = path
        self.buffer = bytearray()
        self.lock = threading.Lock()
        self.next_req = 0
        try:
            greeting = self.read(HEAD_WAIT)  # the node says first whether it takes this process
        except IntercomError as exc:
            self.sock.close()
            raise NotConnected(f"the intercom at {path} did not take this connection: {exc}") from None
        if isinstance(greeting, Failed):
            self.sock.close()
            raise NotConnected(greeting.message)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Intercom":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, wait: float | None) -> Answer:
        """The next frame from the node (waiting at most ``wait`` seconds; None: until it comes)."""
        self.sock.settimeout(wait)
        while True:
            body = unframe(self.buffer, FROM_NODE)
            if body is not None:
                try:
                    return _answers.decode(body)
                except msgspec.DecodeError as exc:
                    raise IntercomError(f"bad frame from the node: {exc}") from None
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                raise Timeout("no answer from the node daemon in time") from None
            except OSError as exc:
                raise JobEnded(f"the intercom connection broke: {exc.strerror or exc}") from None
            if not chunk:
                raise JobEnded("the node closed the intercom: the job ended here, or its node daemon stopped")
            self.buffer += chunk

    def call(self, make: Callable[[int], Frame], timeout: float | None) -> Done:
        """Send the frame ``make(req)`` and wait for its answer (``timeout`` plus slack; None: no limit)."""
        with self.lock:
            self.next_req += 1
            req = self.next_req
            try:
                self.sock.sendall(pack(make(req)))
            except OSError as exc:
                raise JobEnded(f"the intercom connection broke: {exc.strerror or exc}") from None
            wait = None if timeout is None else max(0.0, timeout) + SLACK
            while True:
                answer = self.read(wait)
                if isinstance(answer, Update) or answer.req != req:
                    continue
                if isinstance(answer, Failed):
                    raise ERRORS.get(answer.code, IntercomError)(answer.message)
                return answer

    def put(self, key: str, value: str) -> int:
        """Set key to value for the whole job; returns the key's new version (1, 2, ...)."""
        _check_text(key=key, value=value)
        return self.call(lambda req: Put(req, key, value), HEAD_WAIT).version

    def get(self, key: str, timeout: float | None = None) -> str:
        """The key's value; when it was never put, wait for its first put (at most ``timeout`` seconds)."""
        _check_text(key=key)
        return self.call(lambda req: Get(req, key, timeout), timeout).value

    def fence(self, timeout: float | None = None) -> None:
        """Return once every process of the job's run has called fence (puts made before are visible)."""
        self.call(lambda req: Fence(req, timeout), timeout)

    def send(self, command: str, to: str = "") -> int:
        """Queue ``command`` for the processes ``to`` selects; returns how many it was delivered to."""
        _check_text(command=command)
        nodes, procs, me = job_layout()
        try:
            ranks = select(to, nodes, procs, me)
        except ValueError as exc:
            raise IntercomError(str(exc)) from None
        if not ranks:
            raise IntercomError(f"no process of this job matches the condition {to!r}")
        return self.call(lambda req: Send(req, command, ranks, to), HEAD_WAIT).count

    def recv(self, timeout: float | None = None, replies: bool = False) -> tuple[str, str]:
        """The next command (or reply) sent to this process, as (text, sender NODE/RANK)."""
        done = self.call(lambda req: Recv(req, timeout, replies), timeout)
        return done.value, done.sender

    def reply(self, sender: str, text: str) -> None:
        """Answer one sender (NODE/RANK, as recv gave it): it receives ``text`` as a reply."""
        _check_text(text=text)
        nodes, procs, _ = job_layout()
        try:
            rank = rank_of(sender, nodes, procs)
        except ValueError as exc:
            raise IntercomError(str(exc)) from None
        self.call(lambda req: Send(req, text, [rank], sender, True), HEAD_WAIT)

    def subscribe(self, callback: Callable[[str, str, int], None]) -> "Subscription":
        """Call ``callback(key, value, version)`` (on a thread of its own) for every later put of the job."""
        return Subscription(callback, self.path)


class Subscription:
    """Pushed updates on a connection of their own; ``close()`` ends them."""

    def __init__(self, callback: Callable[[str, str, int], None], path: str | None = None):
        self.conn = Intercom(path)
        self.conn.call(lambda req: Subscribe(req), HEAD_WAIT)
        self.callback = callback
        self.thread = threading.Thread(target=self._run, name="cm-intercom-subscription", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                frame = self.conn.read(None)
            except IntercomError:
                return
            if isinstance(frame, Update):
                self.callback(frame.key, frame.value, frame.version)

    def close(self) -> None:
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()


def _check_text(**texts: str) -> None:
    for name, value in texts.items():
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, not {type(value).__name__}")


# --- the module-level calls: one shared connection per process ----------------

_default: Intercom | None = None
_default_lock = threading.Lock()


def connection() -> Intercom:
    """This process's shared connection (made on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Intercom()
        return _default


def put(key: str, value: str) -> int:
    return connection().put(key, value)


def get(key: str, timeout: float | None = None) -> str:
    return connection().get(key, timeout)


def fence(timeout: float | None = None) -> None:
    connection().fence(timeout)


def send(command: str, to: str = "") -> int:
    return connection().send(command, to)


def recv(timeout: float | None = None) -> tuple[str, str]:
    return connection().recv(timeout)


def reply(sender: str, text: str) -> None:
    connection().reply(sender, text)


def subscribe(callback: Callable[[str, str, int], None]) -> Subscription:
    return connection().subscribe(callback)


for _f, _m in ((put, Intercom.put), (get, Intercom.get), (fence, Intercom.fence), (send, Intercom.send),
               (recv, Intercom.recv), (reply, Intercom.reply), (subscribe, Intercom.subscribe)):
    _f.__doc__ = _m.__doc__
