"""What the webhook deliveries (cm.head.notify) write: a failed one, on its job, from a worker thread."""

from __future__ import annotations

from cm.store.documents import Job


def record_failure(job_id: int, text: str) -> None:
    """Set the job's notify_error (whatever its state: a begin's delivery may fail while the job runs)."""
    Job._get_collection().update_one({"_id": job_id}, {"$set": {"notify_error": text}})
