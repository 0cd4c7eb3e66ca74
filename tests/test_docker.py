"""The Docker cluster for real: a real engine, real images, real containers, real compose.

`make` runs in a clean copy of this tree (what git tracks, as it is in the
work tree), under a compose project name of its own (`cmtest<pid>`: its
containers, network and image tag), so nothing here can be confused with a
user's `make` cluster. The project's network is its own: its containers
talk only to each other. The tests run in file order on that one cluster,
and the last one stops it and checks that nothing of it is left.

Skipped, with the reason, only where no Docker engine answers (`make
engine` as root installs and starts one; .ci/run does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = f"cmtest{os.getpid()}"
NODES = {"computenode-gpu-1": "gpu", "computenode-gpu-2": "gpu", "computenode-cpu-1": "cpu",
         "computenode-cpu-2": "cpu"}
SERVICES = ["mongo", "headnode", *NODES]
MAKE_TIMEOUT = 1200  # a cold first build: debootstrap, wheelhouse, Compose from source

pytestmark = pytest.mark.timeout(MAKE_TIMEOUT + 600)


def engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run(argv: list[str], timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def container(service: str) -> str:
    return f"{PROJECT}-{service}-1"


def leftovers() -> str:
    label = f"label=com.docker.compose.project={PROJECT}"
    return (run(["docker", "ps", "-aq", "--filter", label]).stdout
            + run(["docker", "network", "ls", "-q", "--filter", label]).stdout).strip()


class DockerCluster:
    """The `make` cluster of a clean tree."""

    def __init__(self, tree: Path):
        self.tree = tree
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("CM_") and k != "MONGODB_URI"},
                    "COMPOSE_PROJECT_NAME": PROJECT}
        self.make_output = ""

    def make(self, *targets: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
        return run(["make", "--no-print-directory", "-C", str(self.tree), *targets], timeout=timeout, env=self.env,
                   input=stdin)

    def head(self, *argv: str, user: tuple[int, int] | None = None, check: bool = True, timeout: float = 60,
             service: str = "headnode") -> subprocess.CompletedProcess:
        """A command on a container (the head by default), as root or as (uid, gid) in that user's home."""
        opts = []
        if user is not None:
            name = self.user_name(user[0])
            opts = ["-u", f"{user[0]}:{user[1]}", "-w", f"/home/{name}", "-e", f"HOME=/home/{name}"]
        return run(["docker", "exec", *opts, container(service), *argv], timeout=timeout, check=check)

    def user_name(self, uid: int) -> str:
        for line in (self.tree / "drive" / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[2] == str(uid):
                return fields[0]
        raise KeyError(uid)

    def info(self) -> dict:
        return json.loads(self.head("cminfo", "--all", "--json").stdout)

    def node_states(self) -> dict[str, str]:
        return {n["name"]: n["state"] for n in self.info()["nodes"]}

    def job(self, job_id: int) -> dict:
        return next(j for j in self.info()["jobs"] if j["id"] == job_id)

    def wait(self, what: str, check, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.5)
        raise AssertionError(f"{what}: not within {timeout:.0f} s")

    def adduser(self, name: str) -> tuple[int, int]:
        self.make("adduser", f"USER={name}", timeout=30)
        for line in (self.tree / "drive" / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2]), int(fields[3])
        raise AssertionError(f"make adduser USER={name} did not add {name} to drive/etc/passwd")


def clean_tree(dest: Path) -> Path:
    """What git tracks (and new files it does not ignore), as they are in the work tree; no drive state."""
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=str(REPO)).stdout
    for rel in filter(None, files.split("\0")):
        src = REPO / rel
        if src.is_file() or src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not engine_answers():
        pytest.skip("no Docker engine answers here (`make engine` as root installs and starts one)")
    if os.geteuid() != 0:
        pytest.skip("needs root: make adduser gives users' homes to them, the test gives them their data")
    tree = clean_tree(tmp_path_factory.mktemp("docker") / "cm")
    c = DockerCluster(tree)
    try:
        t0 = time.monotonic()
        done = c.make(timeout=MAKE_TIMEOUT)
        c.make_output = done.stdout + done.stderr
        print(f"make from a clean tree: {time.monotonic() - t0:.0f} s\n{c.make_output}")
        yield c
    finally:
        subprocess.run(["make", "--no-print-directory", "-C", str(tree), "stop"], env=c.env, capture_output=True,
                       timeout=120)
        # only if make stop failed; the last test checks that it did not
        label = f"label=com.docker.compose.project={PROJECT}"
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", label], capture_output=True, text=True,
                             timeout=30).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=60)
        ids = subprocess.run(["docker", "network", "ls", "-q", "--filter", label], capture_output=True, text=True,
                             timeout=30).stdout.split()
        if ids:
            subprocess.run(["docker", "network", "rm", *ids], capture_output=True, timeout=60)
        for tag in (f"cm-cluster/cm:{PROJECT}", f"cm-cluster/ferretdb:{PROJECT}"):
            subprocess.run(["docker", "image", "rm", tag], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def alice(cluster):
    return cluster.adduser("alice")


def test_make_says_in_one_line_which_way_it_built_the_images(cluster):
    lines = [line for line in cluster.make_output.splitlines() if line.startswith("images (")]
    assert len(lines) == 1, cluster.make_output
    assert lines[0].startswith(("images (registry: ", "images (offline: ")), lines[0]
    assert "database" in lines[0]


def test_make_returns_with_four_idle_nodes_in_two_partitions(cluster):
    assert "4 of 4 nodes IDLE" in cluster.make_output
    nodes = cluster.info()["nodes"]
    assert {n["name"]: (n["partition"], n["state"]) for n in nodes} == {
        name: (part, "IDLE") for name, part in NODES.items()}


def test_every_service_has_a_healthcheck_that_passes_and_a_restart_policy(cluster):
    for service in SERVICES:
        state = json.loads(run(["docker", "inspect", container(service)]).stdout)[0]
        assert state["State"]["Health"]["Status"] == "healthy", (service, state["State"]["Health"])
        assert state["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped", service


def test_a_node_healthcheck_fails_when_the_head_does_not_list_the_node(cluster):
    ok = cluster.head("cm-health", "node", service="computenode-gpu-1", check=False)
    assert ok.returncode == 0, ok.stderr
    lie = cluster.head("sh", "-c", "n=$(cat /run/cm-node-name); echo computenode-nowhere >/run/cm-node-name; "
                       "cm-health node; rc=$?; echo $n >/run/cm-node-name; exit $rc",
                       service="computenode-gpu-1", check=False)
    assert lie.returncode != 0
    assert "not registered" in lie.stderr + lie.stdout


def test_the_containers_are_on_a_network_of_their_own_that_leads_nowhere_else(cluster):
    networks = json.loads(run(["docker", "network", "inspect", f"{PROJECT}_default"]).stdout)
    assert len(networks) == 1 and networks[0]["Internal"] is True
    members = {c["Name"] for c in networks[0]["Containers"].values()}
    assert members == {container(s) for s in SERVICES if s != "mongo"}  # the database has no network at all
    reach = cluster.head("python3", "-c", "import socket; socket.create_connection(('computenode-cpu-2', 7818), 5)")
    assert reach.returncode == 0


def test_a_user_on_the_head_cannot_reach_the_database(cluster, alice):
    state = json.loads(run(["docker", "inspect", container("mongo")]).stdout)[0]
    assert state["HostConfig"]["NetworkMode"] == "none"
    probe = (
        "import socket\n"
        "tried = []\n"
        "for family, addr in ((socket.AF_UNIX, '/cm/db/db.sock'), (socket.AF_INET, ('mongo', 27017))):\n"
        "    try:\n"
        "        socket.create_connection(addr, 3) if family == socket.AF_INET else socket.socket(family).connect(addr)\n"
        "        tried.append('connected')\n"
        "    except OSError as exc:\n"
        "        tried.append(type(exc).__name__)\n"
        "print(' '.join(tried))\n")
    assert cluster.head("python3", "-c", probe, user=alice).stdout.split() == ["PermissionError", "gaierror"]
    assert cluster.head("python3", "-c", probe).stdout.split()[0] == "connected"  # the head's root does
    for service in NODES:  # and no compute node needs it: no socket, no URI
        assert cluster.head("sh", "-c", "test ! -e /cm/db && test -z \"${MONGODB_URI:-}\"", service=service,
                            check=False).returncode == 0, service


def test_make_exec_head_gives_a_shell_as_root_or_as_a_user_in_their_home(cluster, alice):
    root = cluster.make("exec-head", stdin="id -un; hostname; cminfo >/dev/null && echo head-answers\n")
    assert root.stdout.split() == ["root", "headnode", "head-answers"], root.stdout
    user = cluster.make("exec-head", "USER=alice", stdin="id -un; pwd\n")
    assert user.stdout.split() == ["alice", "/home/alice"], user.stdout
    stranger = run(["make", "--no-print-directory", "-C", str(cluster.tree), "exec-head", "USER=nosuchuser"],
                   env=cluster.env, input="id\n", check=False)
    assert stranger.returncode != 0
    assert stranger.stderr.splitlines()[0] == "make: no user nosuchuser: make adduser USER=nosuchuser first"


def test_make_adduser_gives_every_node_the_user_and_a_home_on_the_drive(cluster, alice):
    home = cluster.tree / "drive" / "home" / "alice"
    assert (home.stat().st_uid, home.stat().st_gid) == alice
    for service in ["headnode", *NODES]:
        assert cluster.head("id", "-u", "alice", service=service).stdout.strip() == str(alice[0]), service
    again = cluster.make("adduser", "USER=alice")
    assert "exists" in again.stdout
    assert sum(line.startswith("alice:") for line in (cluster.tree / "drive/etc/passwd").read_text().splitlines()) == 1


def test_root_s_su_to_a_user_works_on_the_head_and_the_nodes_as_on_any_host(cluster, alice):
    # su's PAM (pam_rootok, then pam_unix's account check) needs the user's shadow entry, not only passwd's
    for service in ["headnode", "computenode-cpu-1"]:
        done = cluster.head("su", "-", "alice", "-c", 'id -un; pwd; echo "$SHELL"', service=service, check=False)
        assert done.returncode == 0, f"{service}: su - alice: {done.stderr}"
        assert done.stdout.split() == ["alice", "/home/alice", "/bin/bash"], (service, done.stdout)
    # and she uses cm there as in `make exec-head USER=alice`
    assert "computenode-cpu-1" in cluster.head("su", "-", "alice", "-c", "cminfo").stdout
    shadow = cluster.tree / "drive" / "etc" / "shadow"
    assert oct(shadow.stat().st_mode & 0o777) == "0o640", "shadow must not be readable by every user"
    assert cluster.head("su", "-", "alice", "-c", "cat /etc/shadow", check=False).returncode != 0


def test_a_users_job_runs_on_two_gpu_containers_with_cmlogs_hers_in_her_home(cluster, alice):
    job = int(cluster.head("cmrun", "-n", "2", "-p", "2", "--partition", "gpu", "--wait", "--parsable",
                           "sh", "-c", 'echo "$(hostname) $(id -un) $CM_PROC_RANK"', user=alice).stdout)
    logs = cluster.tree / "drive" / "home" / "alice" / "cmlogs" / str(job)
    assert sorted(p.name for p in logs.iterdir()) == ["computenode-gpu-1", "computenode-gpu-2"]
    lines = sorted(f.read_text().strip() for f in logs.glob("*/*.out"))
    assert len(lines) == 4
    assert {line.split()[0] for line in lines} == {"computenode-gpu-1", "computenode-gpu-2"}
    assert {line.split()[1] for line in lines} == {"alice"}
    for path in [logs.parent, logs, *logs.rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == alice, path


def test_the_first_sync_in_a_new_container_does_not_compile(cluster, alice):
    done = cluster.head("env", "NUMBA_DEBUG_CACHE=1", "python3", "-c",
                        "from cm.transfer import batchio; "
                        "batchio.warm_up_writing(); batchio.warm_up_reading()",
                        user=alice, service="computenode-cpu-2")
    out = done.stdout + done.stderr
    assert "data loaded from" in out, out
    assert "data saved to" not in out, out


def tree_digest(top: Path) -> dict[str, str]:
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(top.rglob("*"))}


@pytest.fixture(scope="module")
def synced(cluster, alice):
    src = cluster.tree / "drive" / "data" / "gpu" / "x"
    (src / "small").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(70 << 20))  # two chunks of 64 MiB
    for i in range(300):
        (src / "small" / f"f{i:03d}").write_bytes(os.urandom(100 + i * 41))
    for path in [src, *src.rglob("*")]:
        os.chown(path, *alice)
    done = cluster.head("cmsync", "-n", "2", "--wait", "gpu:/x", "cpu:/x", user=alice, timeout=180)
    return src, cluster.tree / "drive" / "data" / "cpu" / "x", done


def test_a_sync_between_partition_volumes_is_byte_identical(synced):
    src, dst, done = synced
    assert "COMPLETED" in done.stdout + done.stderr
    assert tree_digest(dst) == tree_digest(src)


def test_a_users_synced_files_are_hers(synced, alice):
    _, dst, _ = synced
    wrong = [f"{p}: {p.stat().st_uid}:{p.stat().st_gid}" for p in [dst, *dst.rglob("*")]
             if (p.stat().st_uid, p.stat().st_gid) != alice]
    assert not wrong, f"{len(wrong)} synced paths are not alice's ({alice}), e.g. {wrong[:3]}"


def test_a_killed_node_container_fails_its_job_and_rejoins_under_its_name_when_restarted(cluster, alice):
    job = int(cluster.head("cmrun", "-n", "2", "--partition", "cpu", "--parsable", "sleep", "600", user=alice).stdout)
    cluster.wait("job running", lambda: cluster.job(job)["state"] == "RUNNING", 30)
    run(["docker", "kill", container("computenode-cpu-1")])
    cluster.wait("node DOWN", lambda: cluster.node_states()["computenode-cpu-1"] == "DOWN", 30)
    cluster.wait("job NODE_FAIL", lambda: cluster.job(job)["state"] == "NODE_FAIL", 30)
    run(["docker", "start", container("computenode-cpu-1")])
    cluster.wait("node IDLE again", lambda: cluster.node_states()["computenode-cpu-1"] == "IDLE", 90)
    assert sorted(cluster.node_states()) == sorted(NODES)


def test_a_container_whose_daemon_dies_is_brought_back_by_its_restart_policy(cluster):
    before = json.loads(run(["docker", "inspect", container("computenode-gpu-2")]).stdout)[0]
    os.kill(before["State"]["Pid"], 9)  # the container's first process, as if it crashed
    def restarted():
        now = json.loads(run(["docker", "inspect", container("computenode-gpu-2")]).stdout)[0]
        return now["RestartCount"] > before["RestartCount"] and now["State"]["Running"]
    cluster.wait("container restarted by its policy", restarted, 60)
    cluster.wait("node IDLE under its name", lambda: cluster.node_states().get("computenode-gpu-2") == "IDLE", 90)
    assert sorted(cluster.node_states()) == sorted(NODES)


def test_a_killed_head_container_comes_back_with_every_job_and_node(cluster):
    jobs = {j["id"]: j["state"] for j in cluster.info()["jobs"]}
    before = json.loads(run(["docker", "inspect", container("headnode")]).stdout)[0]
    os.kill(before["State"]["Pid"], 9)
    def restarted():
        now = json.loads(run(["docker", "inspect", container("headnode")]).stdout)[0]
        return now["RestartCount"] > before["RestartCount"] and now["State"]["Running"]
    cluster.wait("head container restarted by its policy", restarted, 60)
    def all_idle():
        done = cluster.head("cminfo", "--all", "--json", check=False)
        if done.returncode != 0:
            return False
        return {n["name"]: n["state"] for n in json.loads(done.stdout)["nodes"]} == dict.fromkeys(NODES, "IDLE")
    cluster.wait("4 nodes IDLE again", all_idle, 90)
    assert {j["id"]: j["state"] for j in cluster.info()["jobs"]} == jobs


def test_make_stop_leaves_no_container_or_network_and_make_again_keeps_the_database(cluster):
    jobs = {j["id"] for j in cluster.info()["jobs"]}
    assert jobs
    stop = cluster.make("stop", timeout=180)
    assert "stopped" in stop.stdout
    assert leftovers() == ""
    again = cluster.make(timeout=600)
    assert "4 of 4 nodes IDLE" in again.stdout
    assert jobs <= {j["id"] for j in cluster.info()["jobs"]}, "the jobs of the first run are gone"
    cluster.make("stop", timeout=180)
    assert leftovers() == ""
    assert (cluster.tree / "drive" / "home" / "alice").is_dir(), "make stop keeps drive/"
