#!/bin/bash
# `make dist-check`: the wheel of `make dist` installed as docs/DEPLOY.md does it, on this machine:
# a fresh venv, `pip install --no-index` from dist/wheelhouse (no network at install time), then every
# command answers --help, the example config loads back, keys init works, and the units verify.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d /tmp/cm-dist-check.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --no-index --find-links dist/wheelhouse dist/cm-*.whl
for c in cmdaemon cminfo cmrun cmkill cmsync cmcontrol cmtoken cmintercom; do
    "$tmp/venv/bin/$c" --help >/dev/null || { echo "dist-check: $c --help failed" >&2; exit 1; }
done
if "$tmp/venv/bin/python" -c 'import zipfile, glob, sys; n = zipfile.ZipFile(glob.glob("dist/cm-*.whl")[0]).namelist(); sys.exit(any("ferretdb" in x for x in n))'; then :; else
    echo "dist-check: the wheel holds the database server" >&2; exit 1; fi
export CM_CONFIG="$tmp/cm.toml" CM_RUN_DIR="$tmp/run"
"$tmp/venv/bin/cmdaemon" config --example > "$tmp/cm.toml"
"$tmp/venv/bin/python" -c 'import tomllib, sys; tomllib.load(open(sys.argv[1], "rb"))' "$tmp/cm.toml"
CM_RUN_DIR="$tmp/run" "$tmp/venv/bin/cmdaemon" keys init >/dev/null
for role in head node db; do "$tmp/venv/bin/cmdaemon" install --role "$role" --prefix "$tmp/root" >/dev/null; done
if command -v systemd-analyze >/dev/null; then systemd-analyze verify "$tmp"/root/etc/systemd/system/cm-*.service; fi
echo "dist-check: $(ls dist/cm-*.whl) installs offline from dist/wheelhouse; every command runs"
