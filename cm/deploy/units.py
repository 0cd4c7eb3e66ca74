"""`cmdaemon install|uninstall --role head|node|db`: cm's systemd units, as slurmctld.service/slurmd.service.

Each unit runs the cmdaemon this command is (the installed entry point), restarts it when it fails, and
leaves its JSON lines to the journal. The node's unit stops only the daemon at first (KillMode=mixed):
the daemon ends its jobs itself within its kill grace, as on any stop, and the head records them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROLES = ("head", "node", "db")
UNIT_DIR = Path("etc/systemd/system")

_DESCRIPTIONS = {"head": "cm head daemon (scheduler, client socket, HTTP API)",
                 "node": "cm compute node daemon (jobs and the data mover)",
                 "db": "cm embedded database server (FerretDB/SQLite on a Unix socket)"}
_ORDER = {  # After=/Wants= beyond network-online.target
    "head": ["cm-db.service"],  # when this machine runs the embedded database; a missing unit is no error
    "node": [],
    "db": [],
}
_SERVICE = {
    "head": ["LimitNOFILE=65536"],  # the API sizes its connection caps from the fd limit
    "node": ["KillMode=mixed", "TimeoutStopSec=60", "LimitNOFILE=65536"],
    "db": [],
}


def unit_name(role: str) -> str:
    return f"cm-{role}.service"


def cmdaemon_path() -> str:
    """The cmdaemon entry point beside this Python (a venv's or the system's), else the one on PATH."""
    beside = Path(sys.executable).with_name("cmdaemon")
    if beside.is_file():
        return str(beside)
    found = shutil.which("cmdaemon")
    if found is None:
        raise FileNotFoundError("no cmdaemon beside this Python or on PATH: install cm's wheel first")
    return os.path.abspath(found)


def unit_text(role: str, cmdaemon: str, config: str) -> str:
    after = " ".join(["network-online.target", *_ORDER[role]])
    lines = [
        "# written by `cmdaemon install` (docs/DEPLOY.md); `cmdaemon uninstall` removes it",
        "[Unit]",
        f"Description={_DESCRIPTIONS[role]}",
        f"After={after}",
        f"Wants={after}",
        "",
        "[Service]",
        "Type=simple",
        f"Environment=CM_CONFIG={config}",
        f"ExecStart={cmdaemon} {role}",
        "Restart=on-failure",
        "RestartSec=2",
        "StandardOutput=journal",
        "StandardError=journal",
        *_SERVICE[role],
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")  # sd_booted()'s test


def _systemctl(*args: str) -> None:
    subprocess.run(["systemctl", *args], check=True)


def install(role: str, prefix: Path, config: str) -> list[str]:
    path = prefix / UNIT_DIR / unit_name(role)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit_text(role, cmdaemon_path(), config))
    path.chmod(0o644)
    said = [f"wrote {path}"]
    if prefix == Path("/") and systemd_running():
        _systemctl("daemon-reload")
        _systemctl("enable", unit_name(role))
        said.append(f"enabled {unit_name(role)}: `systemctl start {unit_name(role)}` starts it now")
    else:
        said.append("systemd is not running here (or --prefix): nothing enabled")
    return said


def uninstall(role: str, prefix: Path) -> list[str]:
    path = prefix / UNIT_DIR / unit_name(role)
    said = []
    live = prefix == Path("/") and systemd_running()
    if live and path.exists():
        _systemctl("disable", "--now", unit_name(role))
        said.append(f"stopped and disabled {unit_name(role)}")
    if path.exists():
        path.unlink()
        said.append(f"removed {path}")
    else:
        said.append(f"no {path}: nothing to remove")
    if live:
        _systemctl("daemon-reload")
    return said
