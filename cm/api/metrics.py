"""/metrics in Prometheus' text format, from the head's `metrics` operation and the API's own counters."""

from __future__ import annotations

from cm.states import JobState, NodeState


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(head: dict, requests: dict[tuple[str, int], int]) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")

    metric("cm_jobs", "gauge", "Jobs by state: every unfinished job and those finished in the last minutes.",
           [({"state": s.value}, head["jobs"].get(s.value, 0)) for s in JobState])
    metric("cm_nodes", "gauge", "Compute nodes by state.",
           [({"state": s.value}, head["nodes"].get(s.value, 0)) for s in NodeState])
    moved = head["moved"]
    metric("cm_sync_bytes_moved_total", "counter", "Bytes that finished sync jobs moved since the head started.",
           [({}, moved["bytes"])])
    metric("cm_sync_files_moved_total", "counter", "Files that finished sync jobs moved since the head started.",
           [({}, moved["files"])])
    metric("cm_sync_jobs_finished_total", "counter", "Sync jobs finished since the head started.",
           [({}, moved["syncs"])])
    metric("cm_sync_bytes_in_flight", "gauge", "Bytes moved so far by the sync jobs still running.",
           [({}, head["sync_bytes_in_flight"])])
    metric("cm_sync_rate_bytes_per_second", "gauge", "Sum of the running sync jobs' current rates.",
           [({}, head["sync_rate"])])
    metric("cm_scheduler_pass_seconds", "gauge", "How long the last scheduler pass took.",
           [({}, head["pass_seconds"])])
    metric("cm_scheduler_passes_total", "counter", "Scheduler passes since the head started.",
           [({}, head["passes"])])
    metric("cm_api_long_polls", "gauge", "Long polls the head holds now (command socket and HTTP API).",
           [({}, head["waiters"])])
    metric("cm_api_requests_total", "counter", "HTTP API requests by method and status code.",
           [({"method": m, "code": str(c)}, n) for (m, c), n in sorted(requests.items())])
    return "\n".join(out) + "\n"
