"""Pure logic: states, protocol schemas, time formats, settings, output patterns."""

import msgpack
import pytest

from cm import config, config_sources
from cm.api import views
from cm.cli import client as cli_client
from cm.node.launch import expand
from cm.protocol import (FRAME_HEADER, VERSION, ErrorCode, Heartbeat, JobEnded, ProtocolError, Reply,
                         Ping, decode, encode, frame, unframe, Info, Cancel, Submit,
                         SubmitSync, SyncOptions)
from cm.states import FINAL_STATES, TRANSITIONS, InvalidTransition, JobState, check_transition
from cm.timefmt import TimeFormatError, format_duration, parse_time


def test_final_states_lead_nowhere():
    for s in JobState:
        assert (not TRANSITIONS[s]) == s.final


def test_a_transition_outside_the_table_raises_with_the_job():
    check_transition(1, JobState.PENDING, JobState.DISPATCHING)
    with pytest.raises(InvalidTransition, match="job 7: COMPLETED -> RUNNING"):
        check_transition(7, JobState.COMPLETED, JobState.RUNNING)
    with pytest.raises(InvalidTransition):
        check_transition(7, JobState.HELD, JobState.RUNNING)


def test_messages_round_trip():
    msg = JobEnded(job_id=3, node="n1", run=1, state="COMPLETED", exit_code=0)
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("payload", [
    b"", b"\xff\xfe garbage", msgpack.packb([1, 2, 3]), msgpack.packb({"v": 99, "t": "heartbeat", "id": "x"}),
    msgpack.packb({"v": VERSION, "t": "nope", "id": "x"}),
    msgpack.packb({"v": VERSION, "t": "heartbeat", "id": "x", "node": "n"}),
    msgpack.packb({"v": VERSION, "t": "heartbeat", "id": "x", "node": 5, "running": []}),
    msgpack.packb({"v": VERSION, "t": "heartbeat", "id": "x", "node": "n", "running": ["a"]}),
    msgpack.packb({"v": VERSION, "t": "heartbeat", "id": "x", "node": "n", "running": [], "evil": 1}),
    msgpack.packb({"v": VERSION, "t": "job_ended", "id": "x", "job_id": True, "node": "n", "run": 1, "state": "X",
                   "exit_code": 0}),
])
def test_anything_that_does_not_fit_a_schema_is_refused(payload):
    with pytest.raises(ProtocolError):
        decode(payload)


def test_frames_split_a_stream_into_messages():
    a, b = Heartbeat(node="n", running=[1]), Ping()
    buf = bytearray(frame(a) + frame(b)[:5])
    assert decode(unframe(buf)) == a
    assert unframe(buf) is None
    buf += frame(b)[5:]
    assert decode(unframe(buf)) == b


@pytest.mark.parametrize("text,seconds", [
    ("5", 300), ("1:30", 90), ("01:02:03", 3723), ("2-0", 172800), ("1-02:03", 93780), ("1-00:00:01", 86401),
])
def test_slurm_time_formats(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "-5", "0", "1-", "x-1"])
def test_bad_times_are_refused(text):
    with pytest.raises(TimeFormatError):
        parse_time(text)


def test_durations_print_like_slurm():
    assert format_duration(5) == "0:05"
    assert format_duration(3723) == "1:02:03"
    assert format_duration(90061) == "1-01:01:01"


def test_settings_come_from_env_then_file_then_defaults(tmp_path):
    f = tmp_path / "cm.toml"
    f.write_text('policy = "least-loaded"\nheartbeat_interval = 2.5\n')
    s = config.load({"CM_CONFIG": str(f), "CM_HEARTBEAT_INTERVAL": "0.5", "MONGODB_URI": "mongodb://x/"})
    assert s.policy == "least-loaded" and s.heartbeat_interval == 0.5 and s.mongodb_uri == "mongodb://x/"
    with pytest.raises(config.ConfigError):
        config.load({"CM_HEARTBEAT_MISSES": "many"})
    f.write_text("no_such = 1\n")
    with pytest.raises(config.ConfigError, match="no_such"):
        config.load({"CM_CONFIG": str(f)})


def test_the_commands_find_the_head_where_settings_put_it(tmp_path):
    f = tmp_path / "cm.toml"
    f.write_text('run_dir = "/from/file"\n')
    for env in ({}, {"CM_RUN_DIR": "/r"}, {"CM_SOCKET": "/s.sock", "CM_RUN_DIR": "/r"}, {"CM_CONFIG": str(f)},
                {"CM_CONFIG": str(f), "CM_RUN_DIR": "/r"}):
        assert config_sources.find_head_socket(env) == str(config.load(env).socket_path), env
    f.write_text("run_dir = [")
    with pytest.raises(config.ConfigError, match="config file"):
        config_sources.find_head_socket({"CM_CONFIG": str(f)})


def test_the_commands_client_speaks_the_protocol(tmp_path):
    """The commands' client makes its requests with the msgpack library: the head's decode reads them, and
    the client reads the head's replies, over a real Unix socket."""
    import socket
    import threading

    assert cli_client.VERSION == VERSION
    assert views.FINAL == {s.value for s in FINAL_STATES}
    path = str(tmp_path / "head.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    seen = []
    replies = [Reply(ok=True, data={"jobs": [{"id": 7, "state": "COMPLETED"}], "n": 1.5, "none": None}),
               Reply(ok=False, error="job 9 does not exist", code=ErrorCode.NOT_FOUND),
               Reply(ok=True, data=[1, 2])]
    other_version = msgpack.packb({"t": "reply", "v": VERSION + 1, "id": "x", "ok": True})
    replies += [len(other_version).to_bytes(FRAME_HEADER, "big") + other_version, b"\x00\x00\x00\x02\xc1\xc1"]

    def head():
        conn = None
        for reply in replies:
            if conn is None:  # the client hangs up on a reply it cannot trust, and comes back
                conn, _ = server.accept()
                buffer = bytearray()
            while (body := unframe(buffer)) is None:
                buffer += conn.recv(65536)
            seen.append(decode(body))
            conn.sendall(reply if isinstance(reply, bytes) else frame(reply))
            if isinstance(reply, bytes):
                conn.close()
                conn = None

    thread = threading.Thread(target=head)
    thread.start()
    client = cli_client.Client(config.load({"CM_SOCKET": path}), timeout=5)
    assert client.call("info", job_id=None, all=False) == replies[0].data
    with pytest.raises(cli_client.HeadError, match="job 9 does not exist") as refused:
        client.call("cancel", job_ids=[9])
    assert refused.value.code == ErrorCode.NOT_FOUND
    assert client.call("submit", job={"kind": "sync", "src": "a:/x", "dst": "b:/y",
                                      "options": {"exclude": ["*.o"]}}) == [1, 2]
    with pytest.raises(cli_client.HeadError, match=f"protocol version {VERSION + 1}"):
        client.call("ping")
    with pytest.raises(cli_client.HeadError, match="garbled reply"):
        client.call("ping")
    thread.join(5)
    server.close()
    assert seen[:3] == [Info(job_id=None, all=False, id=seen[0].id), Cancel(job_ids=[9], id=seen[1].id),
                        Submit(job=SubmitSync(src="a:/x", dst="b:/y", options=SyncOptions(exclude=["*.o"])),
                               id=seen[2].id)]
    assert [type(m) for m in seen[3:]] == [Ping, Ping]


def test_output_patterns_expand_like_slurm():
    assert expand("out/%x-%j.%n.%t.%u.%%", 12, "node-1", 3, "build", "ann") == "out/build-12.node-1.3.ann.%"


def test_the_readme_documents_every_setting_with_its_default():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, default, meaning in config.documented():
        shown = "(empty)" if default == "" else f"`{default}`"
        assert f"| `{name}` | {shown} | {meaning} |" in readme, name


def test_the_commands_tables_lay_out_exactly_like_tabulate():
    import random

    from tabulate import tabulate

    from cm.cli.cminfo import nodes_table, plain_table

    rng = random.Random(2)
    headers = ["ID", "NAME", "USER", "TYPE", "STATE", "TIME", "NODES", "PROGRESS"]
    for _ in range(50):
        rows = [[str(rng.randint(1, 10 ** rng.randint(1, 6))), "x" * rng.randint(0, 12), "root",
                 rng.choice(["command", "sync"]), "RUNNING", "", "n" * rng.randint(0, 20), rng.choice(["", "5%"])]
                for _ in range(rng.randint(0, 5))]
        assert plain_table(rows, headers) == tabulate(rows, headers=headers, tablefmt="plain", disable_numparse=True)
    headers = ["NAME", "PARTITION", "STATE", "CPUS(free/total)", "MEMORY(free/total)"]
    for _ in range(20):
        nodes = [{"name": f"computenode-{i}", "partition": rng.choice(["gpu", "cpu-long"]), "state": "IDLE",
                  "cpus": 2, "cpus_free": i % 3, "mem_mb": 4096, "mem_free_mb": 100 * i} for i in range(rng.randint(0, 4))]
        rows = [[n["name"], n["partition"], n["state"], f"{n['cpus_free']}/{n['cpus']}", f"{n['mem_free_mb']}/{n['mem_mb']}"]
                for n in nodes]
        assert nodes_table(nodes) == tabulate(rows, headers=headers, tablefmt="plain")
