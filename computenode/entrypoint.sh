#!/bin/sh
# Entrypoint of a compute node container.
#
# 1. Names the node: CM_NODE_NAME, else the container's hostname (docker-compose.yml
#    gives each node service both, e.g. computenode-gpu-1), so a restarted or
#    recreated container rejoins as the same node.
# 2. Waits for the CurveZMQ keys the head node creates in CM_RUN_DIR/keys
#    (shared volume) unless CM_CURVE turns CurveZMQ off.
# 3. Runs the command (default: `cmdaemon node`). Users come from drive/etc (below).
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

: "${CM_NODE_NAME:=${HOSTNAME:-$(cat /etc/hostname)}}"
export CM_NODE_NAME
if [ -n "${CM_TRANSFER_HOST:-}" ]; then
    export CM_TRANSFER_HOST
fi

case "${CM_CURVE:-1}" in
    0 | [Ff]alse | FALSE | [Nn]o | NO | [Oo]ff | OFF) ;;
    *)
        keys="$CM_RUN_DIR/keys"
        waited=0
        until [ -f "$keys/head.key" ] &&
            { [ -f "$keys/$CM_NODE_NAME.key_secret" ] || [ -f "$keys/node.key_secret" ]; }; do
            if [ "$waited" -ge 300 ]; then
                echo "cm-entrypoint: no CurveZMQ keys in $keys after ${waited}s; is the head node up?" >&2
                exit 1
            fi
            if [ $((waited % 10)) -eq 0 ]; then
                echo "cm-entrypoint: waiting for the head node's keys in $keys" >&2
            fi
            sleep 1
            waited=$((waited + 1))
        done ;;
esac

echo "$CM_NODE_NAME" >/run/cm-node-name  # for the healthcheck (cm-health node)
echo "cm-entrypoint: node $CM_NODE_NAME, partition ${CM_PARTITION:-default}," \
    "mover at ${CM_TRANSFER_HOST:-$CM_NODE_NAME}:${CM_TRANSFER_PORT:-7818}" >&2
exec "$@"
