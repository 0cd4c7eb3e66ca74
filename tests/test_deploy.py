"""A site's own machines (docs/DEPLOY.md): the example config, the keys commands, the systemd units."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import zmq

from cm import config
from cm.deploy import keys_cli, units
from cm.deploy.example import EXAMPLE_NODE, SITE_VALUES, example

CMDAEMON = [sys.executable, "-m", "cm.daemon"]


def cmdaemon(*argv: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([*CMDAEMON, *argv], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"cmdaemon {' '.join(argv)}: {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def test_the_example_config_names_every_setting_and_loads_back(tmp_path):
    text = cmdaemon("config", "--example", env={"CM_CONFIG": str(tmp_path / "none.toml")}).stdout
    assert text == example()
    for f in dataclasses.fields(config.Settings):
        assert re.search(rf"^(# )?{f.name} = ", text, re.M), f.name
        assert f.metadata["doc"] in text
    path = tmp_path / "cm.toml"
    path.write_text(text)
    settings = config.load({"CM_CONFIG": str(path), "CM_NODE_NAME": "elsewhere"})
    for name, value in SITE_VALUES.items():
        assert getattr(settings, name) == value
    node, table = EXAMPLE_NODE
    mine = config.load({"CM_CONFIG": str(path), "CM_NODE_NAME": node})
    assert {k: getattr(mine, k) for k in table} == table
    assert config.load({"CM_CONFIG": str(path), "CM_NODE_NAME": node, "CM_PARTITION": "x"}).partition == "x"
    # every commented default is valid TOML of its setting's type: uncommented, it gives the defaults
    path.write_text(re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M))
    defaults = config.load({"CM_CONFIG": str(path), "CM_NODE_NAME": "elsewhere"})
    for f in dataclasses.fields(config.Settings):
        if f.name == "node_name":
            continue  # the environment's, above
        expected = SITE_VALUES.get(f.name, f.default)
        assert getattr(defaults, f.name) == expected, f.name


def test_a_node_table_may_set_only_a_nodes_settings(tmp_path):
    path = tmp_path / "cm.toml"
    path.write_text('[nodes.n1]\npartition = "gpu"\nhead_port = 1\n')
    with pytest.raises(config.ConfigError, match=r"\[nodes.n1\] may set only .* not head_port"):
        config.load({"CM_CONFIG": str(path), "CM_NODE_NAME": "n1"})
    assert config.load({"CM_CONFIG": str(path), "CM_NODE_NAME": "n2"}).partition == "default"


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_keys_init_export_import_revoke(tmp_path):
    head, node = tmp_path / "head", tmp_path / "node"
    env = {"CM_RUN_DIR": str(head), "CM_CONFIG": str(tmp_path / "none.toml")}
    made = cmdaemon("keys", "init", env=env).stdout
    assert "made the head secret" in made and "kept" not in made
    kdir = head / "keys"
    before = {p.name: p.read_bytes() for p in kdir.iterdir() if p.is_file()}
    assert set(before) == {"head.key", "head.key_secret", "transfer.key", "api-token.key"}
    assert mode(kdir) == 0o700 and kdir.stat().st_uid == os.geteuid()  # root's alone: it holds the secrets
    assert all(mode(kdir / name) == 0o600 for name in ("transfer.key", "api-token.key"))
    again = cmdaemon("keys", "init", env=env).stdout
    assert "kept head.key_secret, transfer.key, api-token.key" in again and "--force" in again
    assert {p.name: p.read_bytes() for p in kdir.iterdir() if p.is_file()} == before
    cmdaemon("keys", "init", "--force", env=env)
    assert (kdir / "transfer.key").read_bytes() != before["transfer.key"]
    assert (kdir / "head.key").read_bytes() != before["head.key"]

    out = cmdaemon("keys", "export", "n1", "n2", "--out", str(tmp_path), env=env).stdout
    assert "cmdaemon keys import n1.cmkeys" in out
    bundle = json.loads((tmp_path / "n1.cmkeys").read_text())
    assert mode(tmp_path / "n1.cmkeys") == 0o600
    assert set(bundle) == {"format", "node", "head.key", "n1.key", "n1.key_secret"}  # no head secret
    assert bundle["head.key"] == (kdir / "head.key").read_text()
    assert (kdir / "authorized" / "n1.key").read_text() == bundle["n1.key"]
    assert not (kdir / "n1.key_secret").exists()  # the head keeps no node's secret

    node_env = {"CM_RUN_DIR": str(node), "CM_CONFIG": str(tmp_path / "none.toml")}
    wrong = cmdaemon("keys", "import", str(tmp_path / "n1.cmkeys"), env={**node_env, "CM_NODE_NAME": "n2"},
                     check=False)
    assert wrong.returncode == 1 and "holds the keys of node 'n1', and this node is 'n2'" in wrong.stderr
    cmdaemon("keys", "import", str(tmp_path / "n1.cmkeys"), env={**node_env, "CM_NODE_NAME": "n1"})
    assert sorted(p.name for p in (node / "keys").iterdir()) == ["head.key", "n1.key", "n1.key_secret"]
    assert mode(node / "keys") == 0o700 and all(mode(p) == 0o600 for p in (node / "keys").iterdir())
    from cm.keys import node_keys

    assert node_keys(node, "n1")[0].decode() in bundle["n1.key"]

    cmdaemon("keys", "revoke", "n1", env=env)
    assert sorted(p.name for p in (kdir / "authorized").iterdir()) == ["n2.key"]
    missing = cmdaemon("keys", "revoke", "n1", env=env, check=False)
    assert missing.returncode == 1 and "nothing to revoke" in missing.stderr
    with pytest.raises(keys_cli.KeysError, match="keys init"):
        keys_cli.export(str(tmp_path / "nohead"), ["n3"], tmp_path)


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_node_with_a_key_the_head_does_not_know_is_refused_and_told_what_to_do(make_cluster, tmp_path):
    cluster = make_cluster(partitions="cpu:1", nodes=1)
    node_run = tmp_path / "site-1"
    head_env = {"CM_RUN_DIR": str(cluster.run_dir), "CM_CONFIG": str(tmp_path / "none.toml")}
    node_env = {**cluster.base_env(), "CM_RUN_DIR": str(node_run), "CM_NODE_NAME": "site-1", "CM_PARTITION": "cpu",
                "CM_DATA_ROOT": str(tmp_path / "data"), "CM_TRANSFER_PORT": "0", "CM_WARM_SENDER": "false",
                "CM_CONFIG": str(tmp_path / "none.toml")}
    # a keypair the head never saw (exported by another head), with this head's public key
    other = tmp_path / "otherhead"
    keys_cli.init(str(other))
    keys_cli.export(str(other), ["site-1"], tmp_path)
    bundle = json.loads((tmp_path / "site-1.cmkeys").read_text())
    bundle["head.key"] = (cluster.run_dir / "keys" / "head.key").read_text()
    (tmp_path / "site-1.cmkeys").write_text(json.dumps(bundle))
    cmdaemon("keys", "import", str(tmp_path / "site-1.cmkeys"), env=node_env)

    log = tmp_path / "site-1.log"

    def start():
        with open(log, "ab") as out:
            return subprocess.Popen([*CMDAEMON, "node"], env=node_env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def refused_lines() -> int:
        return log.read_text().count("the head refused this node's CurveZMQ key: run `cmdaemon keys export NODE` "
                                     "on the head and `cmdaemon keys import NODE.cmkeys` on the node")

    def joined() -> bool:
        return "site-1" in {n["name"] for n in cluster.info()["nodes"] if n.get("state") != "DOWN"}

    proc = start()
    try:
        wait_for(lambda: refused_lines() >= 1, "the node to say it was refused")
        wait_for(lambda: "refused a node whose CurveZMQ key is not authorised" in cluster.logfile("headnode").read_text(),
                 "the head to log the refused key")
        assert not joined()
        # an authorised key speaking under another node's name is not heard
        from cm.keys import secure_client
        from cm.protocol import Error, ErrorCode, Hello, decode, encode

        impostor = zmq.Context.instance().socket(zmq.DEALER)
        impostor.linger, impostor.identity = 0, b"site-9"
        secure_client(impostor, cluster.run_dir, "computenode-1")
        impostor.connect(f"tcp://127.0.0.1:{cluster.head_port}")
        impostor.send(encode(Hello(node="site-9", partition="cpu", cpus=1, mem_mb=1, version="0", running=[],
                                   transfer_addr="x:1", data_root="/", incarnation="i")))
        assert impostor.poll(5000)  # no Welcome: told it is unknown
        reply = decode(impostor.recv())
        assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_NODE, reply
        impostor.close()
        assert "dropped messages of a connection speaking as node 'site-9'" in cluster.logfile("headnode").read_text()
        assert "site-9" not in {n["name"] for n in cluster.info()["nodes"]}
        # the head exports a keypair for it; imported, the node gets in at its next try
        cmdaemon("keys", "export", "site-1", "--out", str(tmp_path), env=head_env)
        cmdaemon("keys", "import", str(tmp_path / "site-1.cmkeys"), env=node_env)
        wait_for(joined, "the node to join with its exported key")
        # revoked, the head hears it no more at once (it goes DOWN); the node, told so, connects again and
        # is refused with the message
        seen = refused_lines()
        cmdaemon("keys", "revoke", "site-1", env=head_env)
        wait_for(lambda: not joined(), "the revoked node to be DOWN")
        assert "dropped messages of a connection speaking as node 'site-1' with a key that is not its own or " \
               "was revoked" in cluster.logfile("headnode").read_text()
        wait_for(lambda: refused_lines() > seen, "the revoked node to be refused")
    finally:
        proc.terminate()
        proc.wait(30)


# a node daemon of an older release: its cm.__version__ and protocol version patched before anything imports them,
# and every message it sends stamped with its protocol version
OLD_NODE = """
import sys, msgspec, cm, cm.protocol as p
cm.__version__, p.VERSION, new = "0.0.9", p.VERSION - 1, p.encode
def encode(msg):
    return msgspec.msgpack.encode({**msgspec.msgpack.decode(new(msg)), "v": p.VERSION})
p.encode = encode
from cm.daemon import main
sys.exit(main(["node"]))
"""


def test_a_node_of_another_version_is_refused_naming_both_versions(make_cluster, tmp_path):
    from cm import __version__
    from cm.protocol import VERSION

    cluster = make_cluster(partitions="cpu:1", nodes=1)
    node_run = tmp_path / "site-old"
    node_env = {**cluster.base_env(), "CM_RUN_DIR": str(node_run), "CM_NODE_NAME": "site-old", "CM_PARTITION": "cpu",
                "CM_DATA_ROOT": str(tmp_path / "data"), "CM_TRANSFER_PORT": "0", "CM_WARM_SENDER": "false",
                "CM_CONFIG": str(tmp_path / "none.toml")}
    cmdaemon("keys", "export", "site-old", "--out", str(tmp_path),
             env={"CM_RUN_DIR": str(cluster.run_dir), "CM_CONFIG": str(tmp_path / "none.toml")})
    cmdaemon("keys", "import", str(tmp_path / "site-old.cmkeys"), env=node_env)
    refusal = (f"node site-old runs cm 0.0.9 (protocol {VERSION - 1}); this head runs cm {__version__} "
               f"(protocol {VERSION}): upgrade the node")
    log = tmp_path / "site-old.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", OLD_NODE], env=node_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: f"refused a node of another version: {refusal}" in cluster.logfile("headnode").read_text(),
                 "the head to log the refusal")
        wait_for(lambda: f"the head (protocol {VERSION}) refused this node (cm 0.0.9, protocol {VERSION - 1}): "
                         f"{refusal}" in log.read_text(), "the node to log the head's refusal")
        assert "site-old" not in {n["name"] for n in cluster.info()["nodes"]}, "a node of another version joined"
        assert proc.poll() is None  # it keeps trying (upgraded and restarted, it joins)
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_units_verify_and_uninstall_leaves_nothing(tmp_path):
    env = {"CM_CONFIG": "/etc/cm/cm.toml"}
    for role in units.ROLES:
        out = cmdaemon("install", "--role", role, "--prefix", str(tmp_path), env=env).stdout
        assert f"wrote {tmp_path}/etc/systemd/system/cm-{role}.service" in out
    unit_dir = tmp_path / "etc/systemd/system"
    head = (unit_dir / "cm-head.service").read_text()
    for line in ("Restart=on-failure", "After=network-online.target cm-db.service",
                 "Wants=network-online.target cm-db.service", "StandardOutput=journal",
                 "Environment=CM_CONFIG=/etc/cm/cm.toml", f"ExecStart={units.cmdaemon_path()} head"):
        assert line in head.splitlines(), line
    assert "KillMode=mixed" in (unit_dir / "cm-node.service").read_text()
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze here (apt-get install systemd): the units were not verified")
    verify = subprocess.run(["systemd-analyze", "verify", *map(str, sorted(unit_dir.iterdir()))],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    for role in units.ROLES:
        cmdaemon("uninstall", "--role", role, "--prefix", str(tmp_path), env=env)
    assert list(unit_dir.iterdir()) == []


def test_cmdaemon_db_says_how_to_get_the_embedded_server(tmp_path):
    env = {"CM_CONFIG": str(tmp_path / "none.toml"), "CM_FERRETDB_BIN": str(tmp_path / "nope"),
           "CM_DB_DIR": str(tmp_path / "db")}
    out = cmdaemon("db", env=env, check=False)
    assert out.returncode == 1
    assert "missing or not executable" in out.stderr


GUIDE = Path(__file__).resolve().parents[1] / "docs" / "DEPLOY.md"
BLOCK = re.compile(r"^```sh on=([\w,]+)\n(.*?)^```$", re.M | re.S)


def guide_blocks() -> list[tuple[list[str], str]]:
    return [(on.split(","), body) for on, body in BLOCK.findall(GUIDE.read_text())]


def test_the_guide_s_blocks_are_shell_that_names_real_commands_and_settings(tmp_path):
    blocks = guide_blocks()
    assert len(blocks) >= 10
    from cm.deploy.cli import _parser

    seen = set()
    for hosts, body in blocks:
        assert set(hosts) <= {"build", "head", "nodes", "node01", "node02", "user"}, hosts
        syntax = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
        assert syntax.returncode == 0, f"{body}\n{syntax.stderr}"
        for line in body.splitlines():
            m = re.match(r"\s*cmdaemon (\w+.*)$", line)
            if m and m.group(1).split()[0] not in ("head", "node"):
                argv = m.group(1).split(">")[0].replace('"', "").split()
                _parser().parse_args(argv)  # exits (SystemExit) on a command that does not exist
                seen.add(" ".join(argv[:2]))
    for needed in ("config --example", "keys init", "keys export", "keys import", "install --role", "uninstall --role"):
        assert needed in seen, needed
    # the cm.toml the guide writes is a valid configuration: every key a setting, each node's table its own
    toml = re.search(r"cat > /etc/cm/cm.toml <<EOF\n(.*?)^EOF$", GUIDE.read_text(), re.M | re.S).group(1)
    path = tmp_path / "cm.toml"
    path.write_text(toml.replace("$HEAD", "head01").replace("\\`", "`"))
    tomllib.loads(path.read_text())
    node02 = config.load({"CM_CONFIG": str(path), "CM_NODE_NAME": "node02"})
    assert (node02.partition, node02.data_root, node02.head_host) == ("gpu", "/data/gpu", "head01")
    # the firewall table's ports are the defaults
    defaults = config.Settings()
    assert f"`head_port` ({defaults.head_port}/tcp)" in GUIDE.read_text()
    assert f"`transfer_port` ({defaults.transfer_port}/tcp)" in GUIDE.read_text()


def unit_command(path: Path) -> tuple[list[str], dict[str, str]]:
    """ExecStart and Environment of a unit `cmdaemon install` wrote: the daemon as systemd would start it."""
    lines = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")
    return lines["ExecStart"].split(), dict([lines["Environment"].split("=", 1)])


def test_a_site_from_one_cm_toml_and_the_units_commands_runs_a_job_and_a_sync(tmp_path, db_name):
    """The guide on one machine: `cmdaemon db`, the head and two nodes as their units start them, one
    cm.toml with a [nodes.NAME] table per node, keys made by `keys init`, carried by export/import."""
    from cm.cluster.db import EMBEDDED_BIN, free_port, socket_path, socket_uri

    if not EMBEDDED_BIN.exists():
        pytest.skip(f"no {EMBEDDED_BIN}: `make setup` builds it")
    root = Path(tempfile.mkdtemp(prefix="cmsite"))  # short: the database's socket path is limited
    try:
        run_site(root, db_name, EMBEDDED_BIN, socket_uri(socket_path(root / "db")), free_port())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_site(root: Path, db_name: str, ferretdb: Path, db_uri: str, head_port: int) -> None:
    (root / "data" / "cpu" / "in").mkdir(parents=True)
    (root / "data" / "cpu" / "in" / "f").write_text("hello\n")
    (root / "data" / "gpu").mkdir(parents=True)
    cm_toml = root / "cm.toml"
    cm_toml.write_text(f"""
run_dir = "{root}/head"
head_host = "127.0.0.1"
bind_host = "127.0.0.1"
head_port = {head_port}
db_dir = "{root}/db"
ferretdb_bin = "{ferretdb}"
mongodb_uri = "{db_uri}"
db_name = "{db_name}"
transfer_host = "127.0.0.1"
transfer_bind = "127.0.0.1"
transfer_port = 0
warm_sender = false
[nodes.site-1]
partition = "cpu"
data_root = "{root}/data/cpu"
[nodes.site-2]
partition = "gpu"
data_root = "{root}/data/gpu"
""")
    env = {"CM_CONFIG": str(cm_toml)}
    cmdaemon("keys", "init", env=env)
    cmdaemon("keys", "export", "site-1", "site-2", "--out", str(root), env=env)
    for role in units.ROLES:
        cmdaemon("install", "--role", role, "--prefix", str(root / "sys"), env=env)
    procs = []
    logs = root / "logs"
    logs.mkdir()

    def start(role: str, name: str, extra: dict) -> None:
        argv, unit_env = unit_command(root / "sys" / units.UNIT_DIR / units.unit_name(role))
        assert unit_env == {"CM_CONFIG": str(cm_toml)}
        base = {k: v for k, v in os.environ.items() if not k.startswith("CM_") and k != "MONGODB_URI"}
        with open(logs / f"{name}.log", "ab") as out:
            procs.append(subprocess.Popen(argv, env={**base, **unit_env, **extra}, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    def cli(*argv: str) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).parent / argv[0]
        return subprocess.run([str(exe), *argv[1:]], capture_output=True, text=True, timeout=120, cwd=root,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("CM_")}, **env})

    try:
        start("db", "db", {})
        start("head", "head", {})
        for name in ("site-1", "site-2"):
            # one machine stands in for two: each node's run dir of its own, as on its own machine
            node_env = {**env, "CM_RUN_DIR": str(root / name), "CM_NODE_NAME": name}
            cmdaemon("keys", "import", str(root / f"{name}.cmkeys"), env=node_env)
            start("node", name, {"CM_RUN_DIR": str(root / name), "CM_NODE_NAME": name})

        def nodes() -> dict:
            out = cli("cminfo", "--json")
            return {n["name"]: n for n in json.loads(out.stdout)["nodes"]} if out.returncode == 0 else {}

        wait_for(lambda: {n: (v["partition"], v["state"]) for n, v in nodes().items()}
                 == {"site-1": ("cpu", "IDLE"), "site-2": ("gpu", "IDLE")}, "both nodes IDLE in their partitions")
        job = cli("cmrun", "--wait", "--partition", "gpu", "true")
        assert job.returncode == 0, job.stderr
        sync = cli("cmsync", "--wait", "cpu:/in", "gpu:/out")
        assert sync.returncode == 0, sync.stderr + "".join(p.read_text() for p in logs.iterdir())
        assert (root / "data" / "gpu" / "out" / "f").read_text() == "hello\n"
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
