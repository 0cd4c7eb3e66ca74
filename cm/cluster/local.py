"""A whole cluster on one machine: database, head and compute daemons as processes.

`python -m cm.cluster.local up|down|status` is what `make local-up` and
`make local-down` run; the tests use LocalCluster directly. Every daemon gets
`RUN_DIR/<name>.pid` and `RUN_DIR/<name>.log`; `RUN_DIR/cm.env` puts the
commands on PATH and points them at this head. The database is the head's
alone: the embedded server listens on a socket in its 0700 data directory, a
URI the user chose (MONGODB_URI) goes to the head only, and cm.env (which
every user may read) names neither.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cm.cluster.db import free_port, socket_path, socket_uri  # light: pymongo is imported only when pinging
from cm.node.purge import pid_alive

REPO = Path(__file__).resolve().parents[2]


class ClusterError(RuntimeError):
    pass


def parse_partitions(text: str, nodes: int) -> list[tuple[str, str]]:
    """'gpu:2,cpu:2' -> [(computenode-1, gpu), ...]; a bare name takes an equal share of NODES."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ClusterError("no partitions given")
    counts = []
    for p in parts:
        name, _, n = p.partition(":")
        counts.append((name, int(n) if n else 0))
    unsized = [c for c in counts if c[1] == 0]
    if unsized:
        left = max(0, nodes - sum(n for _, n in counts))
        share, extra = divmod(left, len(unsized))
        counts = [(name, n or share + (1 if i < extra else 0)) for i, (name, n) in enumerate(counts)]
    out, i = [], 0
    for name, n in counts:
        for _ in range(n):
            i += 1
            out.append((f"computenode-{i}", name))
    return out


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM, wait, SIGKILL: nothing left running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:
            if not pid_alive(pid):
                return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@dataclass
class LocalCluster:
    run_dir: Path
    nodes: list[tuple[str, str]] = field(default_factory=lambda: parse_partitions("gpu:2,cpu:2", 4))
    data_dir: Path | None = None
    db_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra CM_* settings for every daemon
    mongodb_uri: str = ""
    # netns mode: database, head and every node in a network namespace of its own (cm/cluster/netns.py)
    netns: bool = False
    netns_prefix: str = ""  # default: derived from run_dir
    netns_subnet: str = "10.203.0.0/24"

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()
        self.data_dir = Path(self.data_dir or self.run_dir.parent / "data").resolve()
        self.db_dir = Path(self.db_dir or self.run_dir.parent / "db").resolve()
        self.procs: dict[str, subprocess.Popen] = {}
        self.head_port = 0
        self.network = None  # a cm.cluster.netns.Network in netns mode, once up() made it

    # --- pieces ----------------------------------------------------------------

    def pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logfile(name), "ab")
        if self.network is not None and name in self.network.hosts:
            argv = self.network.wrap(name, argv)  # `ip netns exec` execs: the pid is the daemon's
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=str(REPO))
        log.close()
        self.pidfile(name).write_text(f"{proc.pid}\n")
        self.procs[name] = proc
        return proc

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CM_") and k != "MONGODB_URI"}
        env.update(
            CM_RUN_DIR=str(self.run_dir), CM_HEAD_HOST="127.0.0.1",
            CM_BIND_HOST="127.0.0.1", CM_HEAD_PORT=str(self.head_port), CM_TRANSFER_HOST="127.0.0.1",
            CM_TRANSFER_BIND="127.0.0.1",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        if self.network is not None:  # as in docker-compose: hosts by name, each on its own address
            env.update(CM_HEAD_HOST="headnode", CM_BIND_HOST="0.0.0.0", CM_TRANSFER_BIND="0.0.0.0")
        return env

    def start_db(self) -> None:
        """The embedded server on its socket (in netns mode in a namespace of its own: a Unix socket is a
        file, so the head reaches it from its own), or the server MONGODB_URI names. Called again, it starts
        this cluster's own server again (after a test stopped it)."""
        if self.mongodb_uri and self.network is None and "db" not in self.procs:
            return  # the caller's server
        from cm.cluster.db import redact, ping

        chosen = os.environ.get("MONGODB_URI", "")
        if chosen and self.network is None:
            self.mongodb_uri = chosen
            try:
                ping(chosen, timeout=10)
            except Exception as exc:  # pymongo's errors
                raise ClusterError(f"the database at MONGODB_URI={redact(chosen)} does not answer ({exc}); "
                                   "unset MONGODB_URI to use the embedded server") from None
            return
        env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
        proc = self._spawn("db", [sys.executable, "-m", "cm.cluster.db", "--data-dir", str(self.db_dir)], env)
        self.mongodb_uri = socket_uri(socket_path(self.db_dir))
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise ClusterError(f"the database server exited with {proc.returncode}:\n{self.tail('db')}")
            try:
                ping(self.mongodb_uri, timeout=0.5)
                return
            except Exception as exc:  # pymongo's errors: not imported here to keep this module light
                if time.monotonic() > deadline:
                    raise ClusterError(f"the database server did not answer in 30 s ({exc}):\n{self.tail('db')}")
                time.sleep(0.1)

    def start_head(self) -> subprocess.Popen:
        if not self.head_port:
            self.head_port = int(self.env.get("CM_HEAD_PORT") or free_port())
        env = {**self.base_env(), "MONGODB_URI": self.mongodb_uri}  # the head's alone: no node needs the database
        return self._spawn("headnode", [sys.executable, "-m", "cm.daemon", "head"], env)

    def start_node(self, name: str, partition: str) -> subprocess.Popen:
        root = self.data_dir / partition
        root.mkdir(parents=True, exist_ok=True)
        env = self.base_env()
        env.update(CM_NODE_NAME=name, CM_PARTITION=partition, CM_DATA_ROOT=str(root),
                   CM_TRANSFER_PORT=env.get("CM_TRANSFER_PORT_" + name.replace("-", "_").upper(), "0"))
        if self.network is not None:
            env["CM_TRANSFER_HOST"] = name
        return self._spawn(name, [sys.executable, "-m", "cm.daemon", "node"], env)

    # --- whole cluster -------------------------------------------------------

    def up(self, timeout: float = 60.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.pidfile("headnode").exists():
            pid = int(self.pidfile("headnode").read_text() or 0)
            if pid and pid_alive(pid):
                raise ClusterError(f"a cluster is already running from {self.run_dir} (head pid {pid}); "
                                   "`make local-down` first")
        from cm.keys import ensure_keys

        ensure_keys(self.run_dir, [n for n, _ in self.nodes])
        try:
            if self.netns:
                self.start_network()
            self.start_db()
            self.start_head()
            for name, partition in self.nodes:
                self.start_node(name, partition)
            self.write_env()
            self.wait_nodes(len(self.nodes), timeout)
        except BaseException:
            self.down()
            raise

    def wait_nodes(self, count: int, timeout: float) -> None:
        from cm.cli.client import HeadError

        client = self.client()
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with {proc.returncode}; see {self.logfile(name)}:\n"
                                       + self.tail(name))
            try:
                nodes = client.call("info")["nodes"]
                up = [n for n in nodes if n["state"] not in ("DOWN", "UNKNOWN")]
                if len(up) >= count:
                    return
                last = f"{len(up)} of {count} nodes up"
            except HeadError as exc:
                last = str(exc)
                client.close()
            time.sleep(0.1)
        raise ClusterError(f"cluster did not come up in {timeout:.0f} s: {last}")

    def client(self, timeout: float = 5.0):
        """A client of this cluster's head."""
        from cm.cli.client import Client
        from cm.config import load

        return Client(load(env={"CM_RUN_DIR": str(self.run_dir)}), timeout=timeout)

    def wait_head(self, timeout: float = 30.0) -> None:
        """Until the head answers on its socket."""
        from cm.cli.client import HeadError

        deadline = time.monotonic() + timeout
        while True:
            client = self.client()
            try:
                client.call("ping")
                return
            except HeadError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"the head did not answer in {timeout:.0f} s:\n" + self.tail("headnode"))
                time.sleep(0.05)
            finally:
                client.close()

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def write_env(self) -> None:
        """RUN_DIR/cm.env, for every user of the head: the commands and the head's socket, never the database."""
        bindir = Path(sys.executable).parent
        (self.run_dir / "cm.env").write_text(
            "# source me: . drive/run/cm.env\n"
            f"export PATH={bindir}:$PATH\n"
            f"export CM_RUN_DIR={self.run_dir}\n"
            + (self._netns_env_note() if self.network is not None else "")
        )

    def down(self) -> None:
        """Stop every daemon this run dir knows of, nodes first, database last."""
        names = sorted(p.stem for p in self.run_dir.glob("*.pid"))
        order = [n for n in names if n.startswith("computenode")] + \
                [n for n in names if n == "headnode"] + [n for n in names if n == "db"] + \
                [n for n in names if not n.startswith("computenode") and n not in ("headnode", "db")]
        for name in order:
            try:
                pid = int(self.pidfile(name).read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid:
                stop_pid(pid)
            self.pidfile(name).unlink(missing_ok=True)
        self.stop_network()
        self.procs.clear()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait()

    # --- netns mode ----------------------------------------------------------------

    @property
    def netns_file(self) -> Path:
        """Holds the network's prefix, so `down` (from another process) can remove it."""
        return self.run_dir / "netns"

    def start_network(self) -> None:
        """A namespace with its own address for db, headnode and every node, on one bridge."""
        import hashlib

        from cm.cluster.netns import Network, NetnsError, cleanup_stale

        prefix = self.netns_prefix or "cm" + hashlib.sha1(str(self.run_dir).encode()).hexdigest()[:8]
        try:
            network = Network(prefix, self.netns_subnet)
            cleanup_stale(prefix)  # a crashed earlier run from this run dir (up() checked none is running)
            self.netns_file.write_text(prefix + "\n")
            network.create()
            self.network = network
            for name in ["db", "headnode", *(n for n, _ in self.nodes)]:
                network.add_host(name)
        except NetnsError as exc:
            raise ClusterError(f"cannot make network namespaces: {exc}") from None

    def stop_network(self) -> None:
        """Remove the network (processes still in it, namespaces, links, /etc/netns). Idempotent."""
        prefix = self.network.prefix if self.network is not None else ""
        if not prefix:
            try:
                prefix = self.netns_file.read_text().strip()
            except OSError:
                return
        from cm.cluster.netns import NetnsError, cleanup_stale

        try:
            cleanup_stale(prefix)
        except NetnsError as exc:
            raise ClusterError(f"cannot remove network {prefix}: {exc}") from None
        self.network = None
        self.netns_file.unlink(missing_ok=True)

    def _netns_env_note(self) -> str:
        lines = [f"# netns mode: network {self.network.prefix}; a shell on a host: "
                 f"ip netns exec {self.network.prefix}-<host> bash"]
        lines += [f"#   {h.name}\t{h.ip}\t{h.ns}" for h in self.network.hosts.values()]
        return "\n".join(lines) + "\n"

    def _network(self):
        if self.network is None:
            raise ClusterError("not in netns mode: no links to cut")
        return self.network

    def cut(self, name: str) -> None:
        """A network partition: name's link goes down, its processes keep running."""
        self._network().cut(name)

    def restore(self, name: str) -> None:
        self._network().restore(name)


# What the cluster decides itself, whatever the caller's environment says: where it runs and how its daemons
# find each other (a node's name, partition, data root and mover port are set per node in start_node).
CLUSTER_OWN = frozenset({"CM_RUN_DIR", "CM_HEAD_HOST", "CM_TRANSFER_HOST"})


def callers_settings(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The caller's CM_* settings (`CM_API_PORT=18471 make local-up`), for every daemon of the cluster."""
    return {k: v for k, v in environ.items() if k.startswith("CM_") and k not in CLUSTER_OWN}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cm.cluster.local")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--run-dir", default=str(REPO / "drive" / "run"))
    parser.add_argument("--nodes", type=int, default=int(os.environ.get("NODES") or 4))
    parser.add_argument("--partitions", default=os.environ.get("PARTITIONS") or "")
    parser.add_argument("--netns", action="store_true",
                        default=os.environ.get("NETNS", "").strip().lower() not in ("", "0", "no", "false"),
                        help="database, head and each node in a network namespace of its own (needs root; "
                             "also NETNS=1)")
    args = parser.parse_args(argv)
    partitions = args.partitions or ("gpu:2,cpu:2" if args.nodes == 4 else "gpu,cpu")
    try:
        cluster = LocalCluster(Path(args.run_dir), parse_partitions(partitions, args.nodes), netns=args.netns,
                               env=callers_settings(os.environ))
        if args.action == "down":
            cluster.down()
            print("local cluster stopped")
            return 0
        cluster.up()
    except (ClusterError, ValueError, OSError) as exc:
        print(f"local-up: {exc}", file=sys.stderr)
        return 1
    print(f"local cluster up: head + {len(cluster.nodes)} nodes "
          f"({', '.join(sorted({p for _, p in cluster.nodes}))}); logs in {cluster.run_dir}")
    print(f"use it with: . {cluster.run_dir / 'cm.env'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
