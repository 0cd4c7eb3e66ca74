"""The HTTP API's thread inside the head: asyncio serving RUN_DIR/api.sock (and TCP when CM_API_PORT is set).

On api.sock the caller is whoever the kernel says (SO_PEERCRED); on TCP,
which speaks TLS (cm.api.tls), whoever the bearer token says. Each door has
its own connection budget, so no flood of one can lock the other out: at most
MAX_CONNECTIONS each (fewer if the head may open fewer than twice as many file
descriptors), CM_MAX_CLIENTS_PER_USER per user; on TCP also
CM_API_MAX_PER_ADDRESS per peer address, counted from the accept, before the
TLS handshake, which must end within CM_API_TIMEOUT.

It never touches head state. Each request becomes (caller, Request, answer)
on a queue, a byte on a pipe wakes the head's loop, and the loop answers it
through the same `handle()` the command socket uses (cm.head.server.serve):
the same rules, the same long poll (the web page under /ui/, cm.api.ui, asks the same way, as the user
of its session). The answer comes back to this thread
with `call_soon_threadsafe`. An idle long poll costs a pending future and a
socket, nothing more, so a thousand of them cost the head nothing per second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import resource
import ssl
import threading
import time
from typing import Hashable

from cm.api import routes, ui
from cm.api.ui.sessions import Sessions
from cm.api.http import HttpError, HttpRequest, encode_response, error_response, read_request
from cm.config import ConfigError, Settings
from cm.callers import Caller, caller_from, caller_of
from cm.logs import event
from cm.protocol import ClientRequest, Reply

log = logging.getLogger("cm.api")
MAX_CONNECTIONS = 8192  # of each door: api.sock and the TCP port
RESERVED_FDS = 1024  # for the head's own sockets, files and database connections
TOKEN_CACHE_SECONDS = 30.0


class Budget:
    """Connections held, by key (a uid, an address), each key up to a limit."""

    def __init__(self) -> None:
        self.held: dict[Hashable, int] = {}

    def take(self, key: Hashable, limit: int) -> bool:
        count = self.held.get(key, 0)
        if count >= limit:
            return False
        self.held[key] = count + 1
        return True

    def give(self, key: Hashable) -> None:
        left = self.held.get(key, 1) - 1
        if left > 0:
            self.held[key] = left
        else:
            self.held.pop(key, None)


class ApiAnswer:
    """Where the head's loop sends the reply to one API request (kept by a long poll)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.loop, self.future = loop, future

    def alive(self) -> bool:
        return not self.future.done()  # cancelled when the client went away or the server stops

    def answer(self, reply: Reply) -> None:
        self.loop.call_soon_threadsafe(self._set, reply)

    def _set(self, reply: Reply) -> None:
        if not self.future.done():
            self.future.set_result(reply)


class ApiServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.inbox: queue.SimpleQueue[tuple[Caller, ClientRequest, ApiAnswer]] = queue.SimpleQueue()
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_w, False)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.servers: list[asyncio.base_events.Server] = []
        self.unix = Budget()  # "all" and each uid, on api.sock
        self.tcp = Budget()  # "all", each address and each uid, on the TCP port
        self.tls: ssl.SSLContext | None = None
        self.door_limit = MAX_CONNECTIONS  # connections of each door at once (start() fits it to the fd limit)
        self.tokens: dict[str, tuple[Caller, float]] = {}  # token -> (caller, checked until)
        self.requests: dict[tuple[str, int], int] = {}  # (method, status) -> count, for /metrics
        self.tcp_address: tuple[str, int] | None = None
        self.sessions = Sessions()  # the web page's (cm.api.ui)

    # --- the head loop's side ------------------------------------------------

    def take(self) -> list[tuple[Caller, ClientRequest, ApiAnswer]]:
        """What arrived since the last call (called by the head loop when wake_fd is readable)."""
        try:
            while os.read(self.wake_fd, 65536):
                pass
        except BlockingIOError:
            pass
        out = []
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def forget_tokens(self) -> None:
        self.tokens = {}

    def start(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # each long poll holds a socket
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        # both doors full must leave the head descriptors of its own: no flood of one runs it out of them
        self.door_limit = max(64, min(MAX_CONNECTIONS, (hard - RESERVED_FDS) // 2))
        self.thread = threading.Thread(target=self._run, name="http-api", daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def stop(self) -> None:
        if self.loop is not None and self.thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        for fd in (self.wake_fd, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.settings.api_socket_path.unlink()
        except OSError:
            pass

    # --- the API thread ------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._listen())
        finally:
            self.ready.set()
        try:
            loop.run_forever()
        finally:
            for server in self.servers:
                server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _listen(self) -> None:
        path = self.settings.api_socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        from cm.api.http import MAX_HEAD

        server = await asyncio.start_unix_server(lambda r, w: self._connection(r, w, tcp=False), str(path),
                                                 limit=MAX_HEAD, backlog=1024)
        os.chmod(path, 0o666)  # anyone may ask; who they are comes from the kernel
        self.servers.append(server)
        if self.settings.api_port:
            from cm.api import tls

            try:
                tls.check_binding(self.settings)
                self.tls = tls.server_context(self.settings) if self.settings.api_tls else None
                tcp = await asyncio.start_server(lambda r, w: self._connection(r, w, tcp=True),
                                                 self.settings.api_host, self.settings.api_port, limit=MAX_HEAD,
                                                 backlog=1024, reuse_address=True)
            except (OSError, ConfigError) as exc:
                event(log, "HTTP API cannot listen on TCP", logging.ERROR, host=self.settings.api_host,
                      port=self.settings.api_port, error=str(exc))
            else:
                self.servers.append(tcp)
                self.tcp_address = tcp.sockets[0].getsockname()[:2]
        event(log, "HTTP API listening", socket=str(path), tcp=self.tcp_address and list(self.tcp_address),
              tls=self.tls is not None)

    async def ask(self, caller: Caller, request: ClientRequest, watch: HttpRequest | None = None) -> Reply:
        """Hand one request to the head's loop and wait for its reply. With ``watch`` (a long poll), a
        client that goes away meanwhile is noticed: its wait is dropped and its connection closed."""
        assert self.loop is not None
        future = self.loop.create_future()
        self.inbox.put((caller, request, ApiAnswer(self.loop, future)))
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full: the head is woken already
        try:
            if watch is None or watch.reader is None:
                return await future
            eof = asyncio.ensure_future(watch.reader.read(1))
            try:
                await asyncio.wait((future, eof), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not eof.done():
                    eof.cancel()
            if not future.done():
                if not eof.cancelled() and eof.exception() is None and eof.result():
                    watch.keep_alive = False  # a pipelined request began: answer this one, then close
                    return await future
                raise ConnectionResetError("the client left during a long poll")
            if eof.done() and not eof.cancelled() and eof.exception() is None and eof.result():
                watch.keep_alive = False
            return future.result()
        finally:
            if not future.done():
                future.cancel()  # the long poll's waiter sees it is no longer alive

    async def caller_for(self, request: HttpRequest) -> Caller:
        """On TCP the caller is whoever the bearer token belongs to; nothing else is believed."""
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise HttpError(401, "this needs Authorization: Bearer TOKEN (run `cmtoken` on the head node)")
        return await self.token_caller(token)

    async def token_caller(self, token: str) -> Caller:
        """Whose token this is (HttpError 401 when nobody's), checked at most TOKEN_CACHE_SECONDS ago."""
        cached = self.tokens.get(token)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        from cm.api import tokens

        assert self.loop is not None
        try:
            uid = await self.loop.run_in_executor(None, tokens.owner, self.settings.run_dir, token)
        except Exception as exc:  # the database is away: not the client's fault, and not a 401 either
            raise HttpError(503, f"cannot check the token now: {str(exc)[:200]}") from None
        if uid is None:
            raise HttpError(401, "unknown, expired or revoked token")
        import pwd

        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            raise HttpError(401, "the token's user no longer exists") from None
        caller = caller_from(uid, entry.pw_gid, 0, self.settings.operator_group)
        if len(self.tokens) > 10000:
            self.tokens = {}
        expires = tokens.expires_of(token)
        ttl = TOKEN_CACHE_SECONDS if not expires else min(TOKEN_CACHE_SECONDS, expires - time.time())
        self.tokens[token] = (caller, now + ttl)
        return caller

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tcp: bool) -> None:
        taken: list[Hashable] = []  # what this connection holds of its door's budget
        budget = self.tcp if tcp else self.unix
        try:
            if not budget.take("all", self.door_limit):
                if not tcp:
                    writer.write(encode_response(error_response(503, "too many connections"), False))
                return
            taken.append("all")
            if tcp:
                address = writer.get_extra_info("peername")[0]
                if not budget.take(("address", address), self.settings.api_max_per_address):
                    return  # no answer: that would cost a TLS handshake for every refused connection
                taken.append(("address", address))
                if self.tls is not None:
                    await writer.start_tls(self.tls, ssl_handshake_timeout=self.settings.api_timeout)
                await self._serve(reader, writer, None, taken)
                return
            caller = caller_of(writer.get_extra_info("socket"), self.settings.operator_group)
            if not budget.take(caller.uid, self._per_user(caller)):
                writer.write(encode_response(error_response(
                    503, f"{caller.user} already has {self.settings.max_clients_per_user} connections open"), False))
                return
            taken.append(caller.uid)
            await self._serve(reader, writer, caller, taken)
        except (ConnectionError, OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        finally:
            for key in taken:
                budget.give(key)
            try:
                writer.close()
            except Exception:
                pass

    def bind(self, caller: Caller, taken: list[Hashable]) -> None:
        """A TCP connection belongs to the user of its first token: counted against that user's connections,
        and no other user's token is taken on it."""
        bound = next((k for k in taken if isinstance(k, tuple) and k[0] == "uid"), None)
        if bound is not None:
            if bound[1] != caller.uid:
                raise HttpError(400, "this connection belongs to another token's user: open a new one", close=True)
            return
        if not self.tcp.take(("uid", caller.uid), self._per_user(caller)):
            raise HttpError(503, f"{caller.user} already has {self.settings.max_clients_per_user} connections open",
                            close=True)
        taken.append(("uid", caller.uid))

    def _per_user(self, caller: Caller) -> int:
        """Connections a user may hold at one door (root is not limited)."""
        return self.door_limit if caller.uid == 0 else self.settings.max_clients_per_user

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Caller | None,
                     taken: list[Hashable]) -> None:
        first = True
        while True:
            method = "?"
            try:
                request = await read_request(reader, self.settings.api_timeout, self.settings.api_max_body_kb << 10,
                                             first)
                if request is None:
                    return
                method = request.method
                caller = peer
                if ui.is_ui(request.path):  # the web page: its own login, a session cookie
                    response = await ui.dispatch(self, peer, request, taken)
                else:
                    if caller is None and not routes.is_public(request.path):
                        caller = await self.caller_for(request)
                        self.bind(caller, taken)
                    response = await routes.dispatch(self, caller, request)
                keep = request.keep_alive  # after dispatch: a long poll may have turned it off
            except HttpError as exc:
                response, keep = error_response(exc.status, exc.message), not exc.close
                if exc.status == 401:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="cm"'
            except Exception:  # a bug here must not take the API down: the client gets a 500, the log a traceback
                log.exception("HTTP API request failed")
                response, keep = error_response(500, "internal error in the HTTP API; see the head's log"), False
            key = (method if method in routes.METHODS else "other", response.status)
            self.requests[key] = self.requests.get(key, 0) + 1
            writer.write(encode_response(response, keep))
            await writer.drain()
            if not keep:
                return
            first = False
