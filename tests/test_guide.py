"""The guide is the test: docs/DEPLOY.md's command blocks, read from the file and run as written, in order,
on four machines whose PID 1 is systemd (containers of Debian bookworm with systemd and OpenSSH from
Debian's packages: `docker/images.sh systemd`).

The machines are what the guide assumes a site has and does not itself set up: root's ssh between them
(the guide copies with scp), the user alice with the same uid everywhere, one /home for all (as NFS
would), each partition's storage at its data root on its nodes (/data/gpu one directory shared by node02
and node03), and `dist/` with the wheels of `make wheelhouse` (the guide's `on=build` block, run here on
this machine) copied to /root/cm-dist. Between the first job and the uninstall, what must survive:
a node container restarted rejoins; `systemctl restart cm-head` mid-job loses nothing; a node whose key
the head does not know (revoked) is refused with the message, and joins again with an exported key.

Measured on this 2-core machine: 105 s when it is idle (the build block 13 s, pip install on the four
machines 46 s, the rest 46 s), 10-11 min at load ~25 (pip install alone 3-5 min); the image's first
build adds ~2 min. So it runs on CI (CI=true, .ci/run: a Docker engine, root) or with CM_TEST_GUIDE=1,
and is skipped otherwise, saying so.
systemd runs as PID 1 with SYS_ADMIN, the host's cgroup (v1) tree and a tmpfs /run; `--privileged` is
refused by this machine's runtime ("unable to apply caps: operation not permitted").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import _on_ci

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "DEPLOY.md"
BLOCK = re.compile(r"^## ([^\n]*)$|^```sh on=([\w,]+)\n(.*?)^```$", re.M | re.S)
PREFIX = f"cmguide{os.getpid()}"
HEAD = "head01"
NODES = {"node01": "cpu", "node02": "gpu", "node03": "gpu"}
USER, UID = "alice", 2000
SYSTEMD = ["--cap-add", "SYS_ADMIN", "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
           "--tmpfs", "/run", "--tmpfs", "/run/lock"]

pytestmark = pytest.mark.timeout(3600)


def run(argv: list[str], timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)[:300]} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done


def guide() -> list[tuple[str, list[str], str]]:
    """(section, where, body) of every ```sh block, in order."""
    section, out = "", []
    for m in BLOCK.finditer(GUIDE.read_text()):
        if m.group(1) is not None:
            section = m.group(1)
        else:
            out.append((section, m.group(2).split(","), m.group(3)))
    return out


def engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Site:
    def __init__(self, root: Path):
        self.root = root

    def container(self, machine: str) -> str:
        return f"{PREFIX}-{machine}"

    def sh(self, machine: str, script: str, check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess:
        """A root shell script on a machine, as an admin's terminal there would run it (strict mode)."""
        return run(["docker", "exec", self.container(machine), "bash", "-euo", "pipefail", "-c", script],
                   check=check, timeout=timeout)

    def user(self, script: str, check: bool = True) -> subprocess.CompletedProcess:
        """alice's login shell on the head (root's `su - alice`)."""
        return run(["docker", "exec", self.container(HEAD), "su", "-", USER, "-c", f"set -euo pipefail\n{script}"],
                   check=check)

    def block(self, where: list[str], body: str) -> None:
        machines = []
        for label in where:
            if label == "build":
                env = {**{k: v for k, v in os.environ.items() if not k.startswith("CM_")}, "CM_CHECKOUT": str(REPO)}
                run(["bash", "-euo", "pipefail", "-c", body], cwd=str(REPO), env=env, timeout=900)
            elif label == "user":
                # "`cminfo` lists node01, node02 and node03 IDLE": a user starts once they are
                self.wait("every node IDLE", self.all_idle)
                self.user(body)
            else:
                machines += list(NODES) if label == "nodes" else [HEAD if label == "head" else label]
        with ThreadPoolExecutor(max(1, len(machines))) as pool:  # every machine at once, as an admin's loop would
            for done in pool.map(lambda m: self.sh(m, body), machines):
                assert done.returncode == 0

    def info(self) -> dict:
        return json.loads(self.user("cminfo --all --json").stdout)

    def state(self, job: int) -> str | None:
        out = self.user("cminfo --all --json", check=False)  # fails while the head restarts
        jobs = json.loads(out.stdout)["jobs"] if out.returncode == 0 else []
        return next((j["state"] for j in jobs if j["id"] == job), None)

    def nodes(self) -> dict[str, str]:
        out = self.user("cminfo --json", check=False)
        return {n["name"]: n["state"] for n in json.loads(out.stdout)["nodes"]} if out.returncode == 0 else {}

    def journal(self, machine: str) -> str:
        """The machine's whole journal: here journald does not tie every line of a unit to it (-u misses some)."""
        return self.sh(machine, "journalctl -o cat --no-pager", check=False).stdout

    def wait(self, what: str, check, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = check()
            if got:
                return got
            time.sleep(0.5)
        raise AssertionError(f"{what}: not within {timeout:.0f} s\nhead: {self.journal(HEAD)[-3000:]}")

    def all_idle(self) -> bool:
        return self.nodes() == {n: "IDLE" for n in NODES}


def boot(site: Site, image: str) -> None:
    run(["docker", "network", "create", PREFIX])
    home = site.root / "home"
    gpu = site.root / "gpu"
    for d in (home, gpu):
        d.mkdir()
    for machine in [HEAD, *NODES]:
        mounts = ["-v", f"{home}:/home"]
        if NODES.get(machine) == "gpu":
            mounts += ["-v", f"{gpu}:/data/gpu"]  # the partition's shared storage
        run(["docker", "run", "-d", "--name", site.container(machine), "--hostname", machine, "--network", PREFIX,
             "--network-alias", machine, *SYSTEMD, *mounts, image])
    key = site.root / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    for machine in [HEAD, *NODES]:
        state = site.sh(machine, "systemctl is-system-running --wait || true", timeout=120).stdout.strip()
        assert state == "running", f"{machine}: systemd says {state}: " + site.sh(machine, "systemctl --failed").stdout
        assert site.sh(machine, "cat /proc/1/comm").stdout.strip() == "systemd"
        run(["docker", "cp", str(key), f"{site.container(machine)}:/root/id_ed25519"])
        run(["docker", "cp", f"{key}.pub", f"{site.container(machine)}:/root/id_ed25519.pub"])
        site.sh(machine, f"""
            install -d -m 0700 /root/.ssh && mv /root/id_ed25519 /root/id_ed25519.pub /root/.ssh/
            cp /root/.ssh/id_ed25519.pub /root/.ssh/authorized_keys
            printf 'StrictHostKeyChecking no\\nUserKnownHostsFile /dev/null\\nLogLevel ERROR\\n' > /root/.ssh/config
            useradd -u {UID} -U -s /bin/bash {'-m' if machine == HEAD else '-M'} {USER}
        """)
    site.sh("node01", f"install -d -o {UID} -g {UID} /data/cpu/{USER}/in && echo hello > /data/cpu/{USER}/in/f")
    site.sh("node02", f"install -d -o {UID} -g {UID} /data/gpu/{USER}")


@pytest.fixture(scope="module")
def site():
    if not (_on_ci() or os.environ.get("CM_TEST_GUIDE") == "1"):
        pytest.skip("takes 2-11 min: runs on CI (CI=true) or with CM_TEST_GUIDE=1")
    if not engine_answers():
        pytest.skip("no Docker engine answers here (`make engine` as root installs and starts one)")
    if os.geteuid() != 0:
        pytest.skip("needs root: the machines' users and the Docker engine")
    image = run(["bash", str(REPO / "docker" / "images.sh"), "systemd"], timeout=900).stdout.split()[-1]
    s = Site(Path(tempfile.mkdtemp(prefix="cmguide")))
    try:
        boot(s, image)
        yield s
    finally:
        for machine in [HEAD, *NODES]:
            subprocess.run(["docker", "rm", "-f", s.container(machine)], capture_output=True, timeout=120)
        subprocess.run(["docker", "network", "rm", PREFIX], capture_output=True, timeout=60)
        shutil.rmtree(s.root, ignore_errors=True)


def copy_dist(site: Site) -> None:
    """`Copy dist/ to every machine (as /root/cm-dist), and .build/bin/cm-ferretdb into the head's`."""
    for machine in [HEAD, *NODES]:
        run(["docker", "cp", str(REPO / "dist"), f"{site.container(machine)}:/root/cm-dist"])
    run(["docker", "cp", str(REPO / ".build" / "bin" / "cm-ferretdb"), f"{site.container(HEAD)}:/root/cm-dist/"])


def test_the_guide_as_written_on_machines_whose_pid_1_is_systemd(site):
    blocks = guide()
    t0 = time.monotonic()
    first_job = uninstalled = False
    for section, where, body in blocks:
        if section.endswith("Uninstall") and not uninstalled:
            assert first_job, "the guide's first job did not run before its uninstall"
            what_must_survive(site)
            uninstalled = True
        site.block(where, body)
        if where == ["build"]:
            copy_dist(site)
        if where == ["user"]:
            first_job = True
            check_first_job(site)
        print(f"{time.monotonic() - t0:6.1f} s  {section}: {' '.join(where)}")
    assert uninstalled
    nothing_left(site)


def check_first_job(site: Site) -> None:
    assert site.all_idle(), site.nodes()
    jobs = sorted(site.info()["jobs"], key=lambda j: j["id"])
    assert [(j["type"], j["state"]) for j in jobs] == [("command", "COMPLETED"), ("sync", "COMPLETED")], jobs
    logs = Path(site.root / "home" / USER / "cmlogs" / str(jobs[0]["id"]))
    assert sorted(p.name for p in logs.iterdir()) == ["node02", "node03"]
    assert site.sh("node03", f"cat /data/gpu/{USER}/in/f").stdout == "hello\n"  # another gpu node sees it


def what_must_survive(site: Site) -> None:
    # a node's machine restarted: systemd starts cm-node, which rejoins under its name
    run(["docker", "restart", site.container("node01")], timeout=120)
    # (the head may list it IDLE still, from before: first its machine's systemd starts cm-node)
    site.wait("systemd to start cm-node on node01",
              lambda: site.sh("node01", "systemctl is-active cm-node", check=False).stdout.strip() == "active")
    site.wait("node01 to rejoin after its restart", site.all_idle)
    # the head restarted mid-job: the job ends as it would have
    job = int(site.user("cmrun -n 2 --partition gpu --parsable sh -c 'sleep 8; hostname'").stdout)
    site.wait("the job to run", lambda: site.state(job) == "RUNNING")
    site.sh(HEAD, "systemctl restart cm-head")
    site.wait("the job to complete across the head's restart", lambda: site.state(job) == "COMPLETED")
    assert sorted(p.name for p in (site.root / "home" / USER / "cmlogs" / str(job)).iterdir()) == ["node02", "node03"]
    # a node whose key the head does not know: refused, and told what to do
    site.sh(HEAD, "cmdaemon keys revoke node03")
    site.wait("node03 to be refused with the message", lambda: "the head refused this node's CurveZMQ key: run "
              "`cmdaemon keys export NODE` on the head and `cmdaemon keys import NODE.cmkeys` on the node"
              in site.journal("node03"))
    assert "dropped messages of a connection speaking as node 'node03' with a key that is not its own or was " \
           "revoked" in site.journal(HEAD)
    site.wait("node03 to be DOWN", lambda: site.nodes().get("node03") == "DOWN")
    # exported and imported again (the guide's section 4), it gets in without a restart
    site.sh(HEAD, "cmdaemon keys export node03 --out /root/cmkeys")
    keys = next(body for section, where, body in guide() if where == ["nodes"] and "keys import" in body)
    site.sh("node03", keys)
    site.wait("node03 to join again with its exported key", site.all_idle)


def nothing_left(site: Site) -> None:
    for machine in [HEAD, *NODES]:
        left = site.sh(machine, """
            ls -d /etc/systemd/system/cm-* /etc/systemd/system/*/cm-* /opt/cm /etc/cm /var/lib/cm \
                /usr/local/bin/cm* /usr/local/libexec/cm-ferretdb /root/cmkeys 2>/dev/null || true
            systemctl list-units --all --no-legend 'cm-*' || true
        """).stdout.strip()
        assert left == "", f"{machine}: left after uninstall:\n{left}"
        running = run(["docker", "exec", site.container(machine), "pgrep", "-a", "-f", "cmdaemon|cm-ferretdb"],
                      check=False).stdout.strip()  # pgrep leaves itself out
        assert running == "", f"{machine}: still running after uninstall:\n{running}"
