"""Hosts of their own: network namespaces joined by a bridge, like docker-compose's network.

A :class:`Network` is a set of Linux network namespaces on one machine:

* a "switch" namespace ``<prefix>-switch`` that holds a bridge ``br0`` — the
  host's own network is never touched (no bridge, veth or route appears in it);
* one namespace ``<prefix>-<name>`` per host, with loopback up and an ``eth0``
  whose veth peer is a port of the bridge, and an address from ``subnet``;
* ``/etc/netns/<prefix>-<name>/hosts`` listing every host of the network, so
  ``headnode``, ``db``, ``computenode-1``… resolve by name inside (``ip netns
  exec`` bind-mounts that file over ``/etc/hosts``).

Usage::

    net = Network("cm1")
    net.create()
    net.add_host("db"); net.add_host("headnode")
    subprocess.Popen(net.wrap("headnode", ["cmdaemon", "head"]))
    net.cut("headnode"); net.restore("headnode")   # a network partition
    net.teardown()                                  # processes, namespaces, links, /etc/netns: all gone

Everything is done with the ``ip`` command of iproute2 and needs root.
Failures to build the network raise :class:`NetnsError` with the reason;
:meth:`Network.teardown` and :func:`cleanup_stale` never raise on things that
are already gone. A prefix is 1-12 lower-case letters and digits (no ``-``),
so the namespaces of one network can never be mistaken for another's.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

NETNS_RUN = Path("/run/netns")  # where `ip netns add` keeps its namespaces
NETNS_ETC = Path("/etc/netns")  # per-namespace files `ip netns exec` mounts over /etc
SWITCH = "switch"
BRIDGE = "br0"
IFACE = "eth0"
PREFIX_RE = re.compile(r"^[a-z0-9]{1,12}$")
HOST_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,40}[A-Za-z0-9])?$")
CLONE_NEWNET = 0x40000000


class NetnsError(RuntimeError):
    """Network namespaces cannot be made or used; the message says why."""


def ip_binary() -> str:
    path = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")
                                       if os.access(p, os.X_OK)), None)
    if not path:
        raise NetnsError("the `ip` command (iproute2) is not installed")
    return path


def _ip(*args: str, ns: str | None = None, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    argv = [ip_binary(), *(["-n", ns] if ns else []), *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`{' '.join(argv)}` failed: {exc}") from None
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or None if they can (tries one)."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    try:
        ip_binary()
    except NetnsError as exc:
        return str(exc)
    probe = f"cmprobe{os.getpid()}"
    try:
        proc = _ip("netns", "add", probe, check=False)
        if proc.returncode != 0:
            return f"`ip netns add` fails here: {(proc.stderr or proc.stdout).strip()}"
        proc = _ip("link", "add", BRIDGE, "type", "bridge", ns=probe, check=False)
        if proc.returncode != 0:
            return f"cannot make a bridge in a network namespace: {(proc.stderr or proc.stdout).strip()}"
        return None
    except NetnsError as exc:
        return str(exc)
    finally:
        _ip("netns", "del", probe, check=False)


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix or ""):
        raise NetnsError(f"bad network prefix {prefix!r}: use 1-12 lower-case letters and digits")
    return prefix


def _namespaces() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_RUN.iterdir())
    except OSError:
        return []


def namespaces(prefix: str) -> list[str]:
    """Names of the namespaces (existing, or with /etc/netns files left) that belong to prefix."""
    check_prefix(prefix)
    found = set(n for n in _namespaces() if n.startswith(prefix + "-"))
    try:
        found.update(p.name for p in NETNS_ETC.iterdir() if p.name.startswith(prefix + "-"))
    except OSError:
        pass
    return sorted(found)


def pids_in(ns: str) -> list[int]:
    """Processes whose network namespace is ns."""
    try:
        proc = _ip("netns", "pids", ns, check=False, timeout=10)
    except NetnsError:
        return []
    if proc.returncode != 0:
        return []
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_all_in(ns: str, timeout: float = 5.0) -> None:
    """SIGKILL every process in ns until none is left (or timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in pids_in(ns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:  # reap our own children at once, so they do not linger as zombies
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def cleanup_stale(prefix: str) -> list[str]:
    """Remove everything of the network with this prefix: processes, namespaces, links, /etc/netns.

    For the leftovers of a crashed run as much as for a normal teardown. Never
    raises on what is already gone; returns the namespaces it removed.
    """
    names = namespaces(prefix)
    if not names:
        return []
    if os.geteuid() != 0:
        raise NetnsError(f"removing network namespaces {', '.join(names)} needs root")
    live = set(_namespaces())
    # hosts first (their processes, then their namespaces: the veths go with them), the switch last
    switch = f"{prefix}-{SWITCH}"
    for ns in [n for n in names if n != switch] + [n for n in names if n == switch]:
        if ns in live:
            kill_all_in(ns)
            try:
                _ip("netns", "del", ns, check=False)
            except NetnsError:
                pass
            leftover = NETNS_RUN / ns
            if leftover.exists():  # a half-made namespace: not a mount point, just the file
                try:
                    subprocess.run(["umount", "-l", str(leftover)], capture_output=True, timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
                leftover.unlink(missing_ok=True)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    return names


def run_in_netns(ns: str, fn, *args, **kwargs):
    """Call fn in a thread whose network namespace is ns; return its result (or raise its error).

    Only the network namespace changes (name resolution still reads this
    process's /etc/hosts), so use addresses, not names.
    """
    result: dict = {}

    def body() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(NETNS_RUN / ns, os.O_RDONLY)
        except OSError as exc:
            result["error"] = NetnsError(f"no network namespace {ns}: {exc}")
            return
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                result["error"] = NetnsError(f"setns into {ns} failed: {os.strerror(err)}")
                return
        finally:
            os.close(fd)
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


@dataclass
class Host:
    name: str
    ns: str  # its network namespace
    ip: str
    port: str  # its veth end on the bridge, in the switch namespace


class Network:
    """Namespaces on a bridge; see the module's docstring."""

    def __init__(self, prefix: str, subnet: str = "10.203.0.0/24"):
        self.prefix = check_prefix(prefix)
        try:
            self.subnet = ipaddress.ip_network(subnet)
        except ValueError as exc:
            raise NetnsError(f"bad subnet {subnet!r}: {exc}") from None
        if self.subnet.version != 4 or self.subnet.num_addresses < 4:
            raise NetnsError(f"subnet {subnet} must be IPv4 with room for hosts")
        self.switch = f"{prefix}-{SWITCH}"
        self.hosts: dict[str, Host] = {}
        self._addresses = self.subnet.hosts()
        self._ports = 0
        self.created = False

    # --- building ------------------------------------------------------------

    def create(self) -> "Network":
        """The switch namespace and its bridge. Raises NetnsError with the reason if that cannot be done."""
        if os.geteuid() != 0:
            raise NetnsError(f"network namespaces need root (running as uid {os.geteuid()})")
        ip_binary()
        if namespaces(self.prefix):
            raise NetnsError(f"network {self.prefix} already exists ({', '.join(namespaces(self.prefix))}); "
                             f"remove it with cleanup_stale({self.prefix!r})")
        self.created = True  # from here on, teardown() has something to remove
        try:
            _ip("netns", "add", self.switch)
            _ip("link", "set", "lo", "up", ns=self.switch)
            _ip("link", "add", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0", ns=self.switch)
            _ip("link", "set", BRIDGE, "up", ns=self.switch)
        except NetnsError:
            self.teardown()
            raise
        return self

    def add_host(self, name: str) -> str:
        """A namespace for host name on the bridge; returns its address. Every hosts file lists it."""
        if not self.created:
            raise NetnsError("create() the network before adding hosts")
        if not HOST_RE.match(name) or name == SWITCH:
            raise NetnsError(f"bad host name {name!r}: letters, digits and '-', not {SWITCH!r}")
        if name in self.hosts:
            raise NetnsError(f"host {name} is already on network {self.prefix}")
        try:
            address = str(next(self._addresses))
        except StopIteration:
            raise NetnsError(f"subnet {self.subnet} is full") from None
        self._ports += 1
        host = Host(name, f"{self.prefix}-{name}", address, f"p{self._ports}")
        # the hosts file first: `ip netns exec` mounts whatever /etc/netns/<ns>/ holds
        self.hosts[name] = host
        self._write_hosts()
        ns = host.ns
        _ip("netns", "add", ns)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", host.port, "type", "veth", "peer", "name", IFACE, "netns", ns, ns=self.switch)
        _ip("link", "set", host.port, "alias", name, ns=self.switch)
        _ip("link", "set", host.port, "master", BRIDGE, "up", ns=self.switch)
        _ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", IFACE, ns=ns)
        _ip("link", "set", IFACE, "up", ns=ns)
        return address

    def _write_hosts(self) -> None:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{h.ip}\t{h.name}" for h in self.hosts.values()]
        text = "# written by cm.cluster.netns for network " + self.prefix + "\n" + "\n".join(lines) + "\n"
        for host in self.hosts.values():
            path = NETNS_ETC / host.ns / "hosts"
            path.parent.mkdir(parents=True, exist_ok=True)
            # rewritten in place (same inode): running processes see it through their bind mount
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o644)

    # --- using ---------------------------------------------------------------

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise NetnsError(f"no host {name!r} on network {self.prefix}") from None

    def ip(self, name: str) -> str:
        return self.host(name).ip

    def namespace(self, name: str) -> str:
        return self.host(name).ns

    def wrap(self, name: str, argv: list[str]) -> list[str]:
        """argv run inside host name's namespace (same pid: `ip netns exec` execs the command)."""
        return [ip_binary(), "netns", "exec", self.namespace(name), *argv]

    def pids(self, name: str) -> list[int]:
        """Processes in host name's namespace."""
        return pids_in(self.namespace(name))

    def cut(self, name: str) -> None:
        """Unplug host name's cable: its bridge port goes down; its processes keep running."""
        _ip("link", "set", self.host(name).port, "down", ns=self.switch)

    def restore(self, name: str) -> None:
        """Plug the cable back in."""
        _ip("link", "set", self.host(name).port, "up", ns=self.switch)

    def is_cut(self, name: str) -> bool:
        out = _ip("-o", "link", "show", self.host(name).port, ns=self.switch).stdout
        flags = out.partition("<")[2].partition(">")[0].split(",")
        return "UP" not in flags

    def run_in(self, name: str, fn, *args, **kwargs):
        """fn(*args, **kwargs) on a thread inside host name's network namespace (see run_in_netns)."""
        return run_in_netns(self.namespace(name), fn, *args, **kwargs)

    def connectable(self, name: str, port: int, timeout: float = 0.5, src: str | None = None) -> bool:
        """True if a TCP connection to host name's port succeeds from src's namespace (default: name's own)."""
        address = self.ip(name)

        def attempt() -> bool:
            try:
                socket.create_connection((address, port), timeout=timeout).close()
                return True
            except OSError:
                return False

        return run_in_netns(self.namespace(src or name), attempt)

    def teardown(self) -> None:
        """Kill every process in the network's namespaces, delete them, their links and /etc/netns files.

        Idempotent; never raises on what is already gone.
        """
        cleanup_stale(self.prefix)
        self.hosts.clear()
        self._addresses = self.subnet.hosts()
        self._ports = 0
        self.created = False

    def __enter__(self) -> "Network":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.teardown()
