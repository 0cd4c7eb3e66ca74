"""The MongoDB documents. Collection names live here and nowhere else."""

from __future__ import annotations

from mongoengine import (
    BooleanField,
    DictField,
    Document,
    EmbeddedDocument,
    EmbeddedDocumentListField,
    FloatField,
    IntField,
    ListField,
    StringField,
)

from cm.states import JobState

JOB_STATES = [s.value for s in JobState]


class Slot(EmbeddedDocument):
    """One node's share of a job: what it was given and how it ended there."""

    node = StringField(required=True)
    rank = IntField(required=True)
    role = StringField(default="run", choices=["run", "src", "dst"])
    cpus = IntField(required=True)
    mem_mb = IntField(required=True)
    started = BooleanField(default=False)
    ended = BooleanField(default=False)
    state = StringField(choices=JOB_STATES + [""], default="")
    exit_code = IntField(default=0)


class Job(Document):
    meta = {
        "collection": "jobs",
        # (ended) and (user, ended): accounting's windows of finished jobs (cm.store.acct)
        "indexes": [("state", "-priority", "submitted"), ("user", "ended"), "ended", ("uid", "idempotency_key")],
        "auto_create_index": False,
    }
    id = IntField(primary_key=True)
    name = StringField(required=True)
    user = StringField(required=True)
    uid = IntField(required=True)
    gid = IntField(required=True)
    kind = StringField(required=True, choices=["command", "sync"])
    state = StringField(required=True, choices=JOB_STATES)
    priority = IntField(default=0)
    partition = StringField(required=True)
    nodes = IntField(required=True)
    procs = IntField(default=1)
    cpus = IntField(default=1)
    mem_mb = IntField(default=0)
    time_limit = FloatField(required=True)  # seconds
    cwd = StringField(default="/")
    argv = ListField(StringField())
    env = ListField(StringField())  # "NAME=value": FerretDB stores no nested arrays, names may hold '.' 
    stdout = StringField(default="")
    stderr = StringField(default="")
    requeue = BooleanField(default=False)
    submitted = FloatField(required=True)
    dispatched = FloatField()  # when the current run was dispatched
    started = FloatField()
    ended = FloatField()
    exit_code = IntField()
    reason = StringField(default="")
    cancel_requested = BooleanField(default=False)  # cancelled while running: CANCELLED once its shares are gone
    slots = EmbeddedDocumentListField(Slot)
    sync = DictField()  # src, dst, options, token, transport; only for kind == "sync" (cm.head.records)
    progress = DictField()  # bytes_done, bytes_total, files_done, files_total, rate; per node merged
    runs = IntField(default=0)  # times dispatched (requeue counts)
    restarts = IntField(default=0)  # times a sync was started again after losing a node
    labels = DictField()  # key -> value, e.g. a workflow's name and namespace (HTTP API, --label)
    idempotency_key = StringField()  # the HTTP API's Idempotency-Key: a repeat from the same uid gets this job
    notify = ListField(StringField())  # webhook URLs (--notify), told of the events in notify_on (cm.head.notify)
    notify_on = ListField(StringField())  # begin, end, fail
    notify_error = StringField(default="")  # the deliveries that failed for good, for cminfo JOBID


class Node(Document):
    """A compute node as last reported. Liveness is the head's memory; this is for restarts."""

    meta = {"collection": "nodes", "auto_create_index": False}
    id = StringField(primary_key=True)  # node name
    partition = StringField(required=True)
    cpus = IntField(required=True)
    mem_mb = IntField(required=True)
    state = StringField(choices=["UP", "DOWN"], default="DOWN")  # liveness at the last change
    drain = BooleanField(default=False)
    reason = StringField(default="")
    transfer_addr = StringField(default="")
    data_root = StringField(default="")
    version = StringField(default="")
    incarnation = StringField(default="")
    last_seen = FloatField()


class Counter(Document):
    meta = {"collection": "counters", "auto_create_index": False}
    id = StringField(primary_key=True)
    seq = IntField(default=0)


class Policy(Document):
    """Cluster-wide admin switches: blocked users (or everyone)."""

    meta = {"collection": "policy", "auto_create_index": False}
    id = StringField(primary_key=True)
    blocked_users = ListField(StringField())
    block_all = BooleanField(default=False)


class IntercomKey(Document):
    """One key of a job's intercom (per run of the job); deleted when the run is over."""

    meta = {"collection": "intercom_keys", "indexes": [("job_id", "run")], "auto_create_index": False}
    id = StringField(primary_key=True)  # "JOB:RUN:KEY"
    job_id = IntField(required=True)
    run = IntField(required=True)
    key = StringField(required=True)
    value = StringField(default="")
    version = IntField(default=1)


class ApiToken(Document):
    """A user's HTTP API token generation. Tokens are signed by the head's secret (cm.api.tokens) and not
    stored; revoking bumps the generation, so every token signed for an older one stops matching."""

    meta = {"collection": "api_tokens", "auto_create_index": False}
    id = IntField(primary_key=True)  # uid
    user = StringField(required=True)
    generation = IntField(default=0)
