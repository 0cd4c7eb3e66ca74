"""`cmdaemon config --example`: the whole /etc/cm/cm.toml, written from the settings' own declarations.

Every setting of cm.config.Settings appears with its meaning and its default, commented out; the few a
site must choose are set, with example values. A ``[nodes.NAME]`` table closes it (cm.config.node_table).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from cm import config

# the settings every site chooses, with example values (the rest keep their defaults)
SITE_VALUES: dict[str, Any] = {
    "run_dir": "/var/lib/cm/run",
    "head_host": "head01",
    "db_uri_file": "/etc/cm/db-uri",
    "data_root": "/data/default",
}
EXAMPLE_NODE = ("node01", {"partition": "gpu", "data_root": "/data/gpu", "cpus": 64, "mem_mb": 256000})


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string for these values


def example() -> str:
    lines = [
        "# /etc/cm/cm.toml: cm's one configuration file, the same on the head and on every node",
        "# (`cmdaemon config --example` wrote it). A setting's environment variable (CM_<NAME>)",
        "# wins over this file; a commented line shows the default.",
        "",
    ]
    for f in dataclasses.fields(config.Settings):
        lines.append(f"# {f.metadata['doc']} ({config.env_name(f.name)})")
        if f.name in SITE_VALUES:
            lines.append(f"{f.name} = {toml_value(SITE_VALUES[f.name])}  # default: {toml_value(f.default)}")
        else:
            lines.append(f"# {f.name} = {toml_value(f.default)}")
        lines.append("")
    name, table = EXAMPLE_NODE
    lines += [
        "# A node's own settings, read by the node whose name (node_name, else its host name) is NAME;",
        f"# one table per node, as slurm.conf's NodeName lines. Allowed: {', '.join(config.NODE_SETTINGS)}.",
        f"[nodes.{name}]",
        *(f"{k} = {toml_value(v)}" for k, v in table.items()),
        "",
    ]
    return "\n".join(lines)
