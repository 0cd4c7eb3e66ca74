"""`cmdaemon keys init|export NODE...|import FILE|revoke NODE`: the CurveZMQ keys of a site, as munge's key.

The head keeps its keypair, its secrets (cm.keys: transfer.key, api-token.key) and ``authorized/``, the
public key of every node it accepts. A node needs only the head's public key and its own keypair: the
data-plane keys of a sync reach its movers from the head with each command, so the transfer secret never
leaves the head. `export` makes a node's keypair, authorises its public key and writes the three into one
file (0600); the head keeps no node's secret key. `import` installs that file on the node.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import zmq.auth

from cm import keys

HEAD_SECRETS = (keys.TRANSFER_SECRET, "api-token.key")  # made by `init`, read by the head alone
BUNDLE_FORMAT = "cm-node-keys/1"


class KeysError(RuntimeError):
    """A keys command cannot do what it was asked (the message says why and what to do)."""


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _write_private(path: Path, text: str) -> None:
    """Write text to path (0600) atomically: a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def init(run_dir: str, force: bool = False, nodes: list[str] = ()) -> list[str]:
    """The head's keypair and secrets; existing ones are kept (and said so) unless force. Returns what it did."""
    kdir = _private_dir(keys.keys_dir(run_dir))
    _private_dir(kdir / "authorized")
    done = []
    existing = [n for n in ("head.key_secret", *HEAD_SECRETS) if (kdir / n).exists()]
    if existing and not force:
        done.append(f"kept {', '.join(existing)} in {kdir} (--force makes new ones: every node must then "
                    "import a new export, and every API token stops working)")
    if force:
        for name in ("head.key", "head.key_secret", *HEAD_SECRETS):
            (kdir / name).unlink(missing_ok=True)
    if not (kdir / "head.key_secret").exists():
        zmq.auth.create_certificates(str(kdir), "head")
        done.append(f"made the head's CurveZMQ keypair {kdir}/head.key_secret")
    for name in HEAD_SECRETS:
        if not (kdir / name).exists():
            keys.secret(run_dir, name)
            done.append(f"made the head secret {kdir}/{name}")
    if nodes:  # a shared run dir (the compose cluster): nodes' keypairs beside the head's
        keys.ensure_keys(run_dir, list(nodes))
        done.append(f"keypairs for {', '.join(nodes)} in {kdir}, authorised")
    return done


def export(run_dir: str, nodes: list[str], out_dir: Path) -> list[Path]:
    """For each node: a new keypair, its public key authorised, and NODE.cmkeys (0600) in out_dir.

    A node exported again gets a new keypair: its old one is no longer accepted."""
    kdir = keys.keys_dir(run_dir)
    try:
        head_public = (kdir / "head.key").read_text()
    except FileNotFoundError:
        raise KeysError(f"no head key in {kdir}: run `cmdaemon keys init` on the head first") from None
    authorized = _private_dir(kdir / "authorized")
    written = []
    for node in nodes:
        if not node or "/" in node or node.startswith(".") or node == "head":
            raise KeysError(f"{node!r} cannot be a node's name here")
        with tempfile.TemporaryDirectory() as tmp:
            public, secret = zmq.auth.create_certificates(tmp, node)
            bundle = {"format": BUNDLE_FORMAT, "node": node, "head.key": head_public,
                      f"{node}.key": Path(public).read_text(), f"{node}.key_secret": Path(secret).read_text()}
        out = out_dir / f"{node}.cmkeys"
        _write_private(out, json.dumps(bundle, indent=1) + "\n")
        _write_private(authorized / f"{node}.key", bundle[f"{node}.key"])
        for stale in (kdir / f"{node}.key", kdir / f"{node}.key_secret"):  # an older keypair kept here
            stale.unlink(missing_ok=True)
        written.append(out)
    return written


def import_(run_dir: str, path: Path, name: str) -> list[Path]:
    """Install an exported file on the node called name: the head's public key, the node's keypair (0600)."""
    try:
        bundle = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot read {path}: {exc}") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise KeysError(f"{path} is not a file `cmdaemon keys export` wrote")
    node = bundle["node"]
    if node != name:
        raise KeysError(f"{path} holds the keys of node {node!r}, and this node is {name!r}: import the file made "
                        f"for it, or name this node {node!r} (node_name in cm.toml, or CM_NODE_NAME)")
    kdir = _private_dir(keys.keys_dir(run_dir))
    installed = []
    for filename in ("head.key", f"{node}.key", f"{node}.key_secret"):
        _write_private(kdir / filename, bundle[filename])
        installed.append(kdir / filename)
    return installed


def revoke(run_dir: str, node: str) -> Path:
    """Take node's public key out of authorized/: the head refuses its next handshake."""
    kdir = keys.keys_dir(run_dir)
    public = kdir / "authorized" / f"{node}.key"
    if not public.exists():
        raise KeysError(f"node {node!r} has no key in {public.parent}: nothing to revoke")
    public.unlink()
    for stale in (kdir / f"{node}.key", kdir / f"{node}.key_secret"):
        stale.unlink(missing_ok=True)
    os.utime(public.parent)  # the head rereads the folder when its mtime changes
    return public
