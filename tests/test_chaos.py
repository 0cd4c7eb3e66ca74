"""Chaos: jobs keep coming while compute daemons are killed and restarted.

At the end every job is in a final state, no command job started twice, and
every completed sync left a byte-identical tree.
"""

from __future__ import annotations

import collections
import random
import signal
import time

from test_sync import make_tree, snapshot

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


def story(cluster, job_ids) -> str:
    """Every line of every daemon's log that names one of job_ids (what the head and nodes did with it)."""
    marks = [f'"job": {j},' for j in job_ids] + [f'"job": {j}}}' for j in job_ids]
    lines = []
    for log in sorted(cluster.run_dir.glob("*.log")):
        lines += [f"{log.stem}: {line}" for line in log.read_text(errors="replace").splitlines()
                  if any(m in line for m in marks)]
    return "\n".join(lines[-400:])


def test_jobs_survive_compute_daemons_being_killed_and_restarted(make_cluster):
    cluster = make_cluster("gpu:2,cpu:2", nodes=4, chunk_mb=1)
    rng = random.Random(11)
    src = cluster.data_dir / "gpu" / "tree"
    make_tree(src, big=4 << 20, small=150)
    log = cluster.home / "ran.log"
    commands, syncs = [], {}
    dead: dict[str, float] = {}  # node -> when to restart it
    partition_of = dict(cluster.nodes)
    end = time.monotonic() + 25
    next_kill = time.monotonic() + 3
    i = 0
    while time.monotonic() < end:
        i += 1
        part = rng.choice(["gpu", "cpu"])
        script = f'echo start $CM_JOB_ID >> {log}; sleep {rng.uniform(0.1, 1.0):.2f}; echo end $CM_JOB_ID >> {log}'
        commands.append(cluster.submit("cmrun", "--partition", part, "-t", "2", "sh", "-c", script))
        if i % 10 == 0:
            dst = f"copy{i}"
            syncs[cluster.submit("cmsync", "-n", str(rng.choice([1, 2])), "gpu:/tree", f"cpu:/{dst}")] = dst
        now = time.monotonic()
        if now >= next_kill and not dead:
            victim = rng.choice(list(partition_of))
            cluster.kill(victim, signal.SIGKILL)
            dead[victim] = now + rng.uniform(1.0, 2.5)
            next_kill = now + rng.uniform(3, 5)
        for name, when in list(dead.items()):
            if now >= when:
                cluster.start_node(name, partition_of[name])
                del dead[name]
        time.sleep(0.15)
    for name in list(dead):
        cluster.start_node(name, partition_of[name])

    deadline = time.monotonic() + 120
    while True:
        jobs = {j["id"]: j for j in cluster.info("--all")["jobs"]}
        if all(jobs[j]["state"] in FINAL for j in [*commands, *syncs]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    unfinished = {j: jobs[j]["state"] for j in [*commands, *syncs] if jobs[j]["state"] not in FINAL}
    assert not unfinished, f"not final after the storm: {unfinished}\n{story(cluster, unfinished)}"

    time.sleep(1)  # let orphans killed on daemon restart finish their last write, if any
    lines = collections.Counter(tuple(line.split()) for line in log.read_text().splitlines())
    for job_id in commands:
        starts = lines[("start", str(job_id))]
        assert starts <= 1, f"job {job_id} started {starts} times"
        if jobs[job_id]["state"] == "COMPLETED":
            assert starts == 1 and lines[("end", str(job_id))] == 1
    states = collections.Counter(j["state"] for j in jobs.values())
    assert states["COMPLETED"] >= len(commands) // 2, states  # the storm hurt some jobs, not most

    completed_syncs = [j for j in syncs if jobs[j]["state"] == "COMPLETED"]
    expected = snapshot(src)
    for job_id in completed_syncs:
        assert snapshot(cluster.data_dir / "cpu" / syncs[job_id]) == expected, f"sync {job_id} differs"
    assert completed_syncs, f"no sync completed: {[jobs[j]['state'] for j in syncs]}"
