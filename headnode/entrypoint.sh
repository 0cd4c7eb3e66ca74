#!/bin/sh
# Entrypoint of the head node container.
#
# Makes sure the CurveZMQ keys exist in CM_RUN_DIR/keys (a volume shared with
# every compute node): the head's pair and the one `node` pair all compute
# nodes use (`cmdaemon keys init` is idempotent: existing keys are kept), then runs
# the command (default: `cmdaemon head`). Users come from drive/etc (below).
set -eu

# Users shared by every container: /etc/passwd, group, shadow and gshadow are
# the files in /cm/etc (drive/etc on the host, see `make adduser`), when there.
etc=/cm/etc
for f in passwd group shadow gshadow; do
    if [ -s "$etc/$f" ] && [ "$(readlink /etc/$f || true)" != "$etc/$f" ]; then
        ln -sf "$etc/$f" "/etc/$f"
    fi
done

: "${CM_RUN_DIR:=/cm/run}"
export CM_RUN_DIR
mkdir -p "$CM_RUN_DIR"

# the database's socket is root's alone (docker-compose.yml), whoever owns the host's folder
if [ -d /cm/db ]; then
    chown 0:0 /cm/db
    chmod 0700 /cm/db
fi

cmdaemon keys init node >/dev/null
echo "cm-entrypoint: CurveZMQ keys ready in $CM_RUN_DIR/keys" >&2

exec "$@"
