"""Every tunable of cm in one place.

Each setting is read from the environment (``CM_<NAME>``), then from the TOML
config file named by ``CM_CONFIG`` (default ``/etc/cm/cm.toml``, keys are the
lower-case names), then falls back to its default. ``MONGODB_URI`` is read
without the prefix because that is the name every MongoDB tool uses.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cm.config_sources import (RUN_DIR, UNSET, ConfigError, coerce, config_file, env_name, head_socket, raw_value,
                               read_config_file)

__all__ = ["ConfigError", "Settings", "documented", "env_name", "load"]


def _setting(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Settings:
    # where things are
    run_dir: str = _setting(RUN_DIR, "directory for sockets, pid files, keys and node state")
    socket: str = _setting("", "Unix socket the head serves clients on (default: RUN_DIR/head.sock)")
    # database
    mongodb_uri: str = _setting("", "MongoDB URI; when empty the local cluster starts the embedded server")
    db_uri_file: str = _setting("", "file holding the MongoDB URI with its credentials, readable by its owner "
                                    "alone (wins over MONGODB_URI)")
    db_name: str = _setting("cm", "database name")
    db_timeout: float = _setting(5.0, "seconds a database call may wait for the server")
    db_dir: str = _setting("/var/lib/cm/db", "data directory of the embedded server `cmdaemon db` (0700); it "
                                             "listens on DB_DIR/db.sock alone")
    ferretdb_bin: str = _setting("", "the embedded server's binary, cm-ferretdb (default: .build/bin/cm-ferretdb "
                                     "of a checkout, made by `make setup`)")
    # control plane
    head_host: str = _setting("127.0.0.1", "address compute nodes connect to")
    head_port: int = _setting(7817, "TCP port of the head's ROUTER socket")
    bind_host: str = _setting("0.0.0.0", "address the head's ROUTER binds to")
    heartbeat_interval: float = _setting(1.0, "seconds between node heartbeats")
    heartbeat_misses: int = _setting(3, "missed heartbeats after which a node is DOWN")
    dispatch_retry: float = _setting(2.0, "seconds before the head resends an unacknowledged command")
    curve: bool = _setting(True, "encrypt and authenticate daemon links with CurveZMQ keys from RUN_DIR/keys")
    # scheduling
    policy: str = _setting("first-fit", "placement policy: first-fit or least-loaded")
    backfill: bool = _setting(True, "let later jobs start when they do not delay the first blocked one")
    default_time: str = _setting("1-00", "time limit of a job that gives none (Slurm format)")
    max_time: str = _setting("7-00", "largest time limit a job may ask for")
    # compute node
    node_name: str = _setting("", "this node's name (default: the host name)")
    partition: str = _setting("default", "partition this node belongs to")
    cpus: int = _setting(0, "CPUs this node offers (0: measure the machine)")
    mem_mb: int = _setting(0, "memory in MB this node offers (0: measure the machine)")
    data_root: str = _setting("drive/data/default", "where this node sees its partition's storage")
    kill_grace: float = _setting(5.0, "seconds between SIGTERM and SIGKILL when a job is stopped")
    kill_confirm: float = _setting(3.0, "seconds after the kill grace a node has to confirm a stopped job is gone; "
                                        "then its slot is released and the node drained")
    # admin
    operator_group: str = _setting("cmoperator", "Unix group whose members may act on every job")
    operator_token: str = _setting("", "token that grants admin rights (empty: none)")
    # limits against a careless or hostile user
    max_pending_per_user: int = _setting(10000, "jobs one user may have waiting (PENDING or HELD), like MaxSubmitJobs")
    max_request_kb: int = _setting(1024, "largest request a client may send to the head, in KiB")
    client_timeout: float = _setting(10.0, "seconds a client may take to send a whole request before it is cut off")
    max_clients_per_user: int = _setting(64, "connections one user may hold open to the head at once")
    # HTTP API (always on RUN_DIR/api.sock; on TCP only when a port is given)
    api_port: int = _setting(0, "TCP port of the HTTP API (0: only the Unix socket RUN_DIR/api.sock)")
    api_host: str = _setting("127.0.0.1", "address the HTTP API's TCP port binds to")
    api_max_body_kb: int = _setting(1024, "largest HTTP request body the API accepts, in KiB")
    api_timeout: float = _setting(10.0, "seconds an HTTP client may take to send a whole request (and, on TCP, "
                                        "to finish the TLS handshake)")
    api_tls: bool = _setting(True, "TLS on the API's TCP port; off is refused unless CM_API_HOST is loopback")
    api_cert: str = _setting("", "the API's TLS certificate (PEM; default: RUN_DIR/api.crt, made by the head)")
    api_key: str = _setting("", "the key of CM_API_CERT (default: RUN_DIR/keys/api.key, made by the head)")
    api_max_per_address: int = _setting(256, "connections one address may hold open to the API's TCP port")
    # mover
    transfer_host: str = _setting("", "address other nodes reach this node's mover on (default: node name)")
    transfer_port: int = _setting(7818, "TCP port of this node's mover (0: pick a free one)")
    transfer_bind: str = _setting("0.0.0.0", "address this node's mover listens on")
    data_encrypt: bool = _setting(True, "encrypt sync data between nodes (AES-256-GCM); false: authenticated only, "
                                        "for a fabric the site trusts")
    streams: int = _setting(4, "parallel TCP streams per sync job")
    chunk_mb: int = _setting(64, "size of a chunk of a large file, in MiB")
    warm_sender: bool = _setting(True, "keep a sender loaded from the node's start and fork every sync's senders from it (~130 MB); false: each starts cold, ~0.5 s")
    # intercom (a job's processes exchanging keys and commands)
    intercom_key_bytes: int = _setting(256, "largest intercom key, in bytes (UTF-8)")
    intercom_value_bytes: int = _setting(65536, "largest intercom value or command, in bytes (UTF-8)")
    intercom_keys: int = _setting(10000, "intercom keys one run of a job may hold")
    intercom_queue: int = _setting(1000, "intercom commands queued for one process that has not read them yet")
    intercom_head_wait: float = _setting(30.0, "seconds an intercom put or send waits for the head before failing")
    # accounting and notifications (cm.acct, cm.head.notify)
    acct_days: float = _setting(365.0, "days a finished job is kept for cmacct; older ones are purged (0: never)")
    notify_urls: str = _setting("", "http(s) URLs, comma-separated, told of every job's end (as --notify URL)")
    notify_retry_for: float = _setting(600.0, "seconds a webhook delivery is retried, with back-off, before it "
                                              "is given up and shown as failed in cminfo JOBID")
    notify_timeout: float = _setting(10.0, "seconds one webhook POST may take")
    # logging
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    head_events: str = _setting("", "file the head appends every event it handles to, one JSON line each, to "
                                    "replay a bug against its state machine (docs/ARCHITECTURE.md)")

    @property
    def socket_path(self) -> Path:
        return Path(head_socket(self.socket, self.run_dir))

    @property
    def api_socket_path(self) -> Path:
        return Path(self.run_dir) / "api.sock"

    @property
    def name(self) -> str:
        return self.node_name or socket.gethostname()

    @property
    def heartbeat_timeout(self) -> float:
        return self.heartbeat_interval * self.heartbeat_misses


def load(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from overrides, then env, then the config file, then defaults."""
    env = os.environ if env is None else env
    from_file = node_table(read_config_file(env), env, overrides)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = raw_value(f.name, env, from_file, overrides)
        if raw is not UNSET:
            values[f.name] = coerce(f.name, type(f.default), raw)
    unknown = set(from_file) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ConfigError(f"config file {config_file(env)}: unknown settings {', '.join(sorted(unknown))}")
    settings = Settings(**values)
    if settings.heartbeat_interval <= 0 or settings.heartbeat_misses < 1:
        raise ConfigError("heartbeat_interval must be > 0 and heartbeat_misses >= 1")
    return settings


NODE_SETTINGS = ("partition", "data_root", "cpus", "mem_mb", "transfer_host", "transfer_port", "transfer_bind")


def node_table(from_file: dict[str, Any], env: Mapping[str, str], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The file's settings with its ``[nodes.NAME]`` table for this node's name over them (as slurm.conf's
    NodeName lines): one file for the whole cluster."""
    nodes = from_file.pop("nodes", {})
    if not isinstance(nodes, dict) or not all(isinstance(t, dict) for t in nodes.values()):
        raise ConfigError(f"config file {config_file(env)}: [nodes.NAME] must be tables")
    raw = raw_value("node_name", env, from_file, overrides)
    name = (coerce("node_name", str, raw) if raw is not UNSET else "") or socket.gethostname()
    mine = nodes.get(name, {})
    unknown = set(mine) - set(NODE_SETTINGS)
    if unknown:
        raise ConfigError(f"config file {config_file(env)}: [nodes.{name}] may set only {', '.join(NODE_SETTINGS)}, "
                          f"not {', '.join(sorted(unknown))}")
    return {**from_file, **mine}


def documented() -> list[tuple[str, Any, str]]:
    """(environment name, default, meaning) for every setting: the README table."""
    return [(env_name(f.name), f.default, f.metadata["doc"]) for f in dataclasses.fields(Settings)]
