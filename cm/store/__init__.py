"""Storage: mongoengine documents and the atomic updates on them."""

from cm.store import intercom

from cm.store.jobs import (
    DatabaseError,
    DatabaseUnreachable,
    StoreError,
    active_jobs,
    all_nodes,
    connect,
    disconnect,
    get_job,
    get_policy,
    insert_job,
    ping,
    reachable,
    reserve_job_ids,
    recent_jobs,
    save_node,
    set_policy,
    transition,
    update_job,
)

__all__ = [
    "intercom",
    "DatabaseError",
    "DatabaseUnreachable",
    "StoreError",
    "active_jobs",
    "all_nodes",
    "connect",
    "disconnect",
    "get_job",
    "get_policy",
    "insert_job",
    "ping",
    "reachable",
    "reserve_job_ids",
    "recent_jobs",
    "save_node",
    "set_policy",
    "transition",
    "update_job",
]
