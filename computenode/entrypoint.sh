#!/bin/sh
# Entrypoint of a compute node container.
#
# 1. Names the node. One compose service (computenode-gpu, computenode-cpu) is
#    scaled to several replicas that share one environment, so when
#    CM_NODE_NAME is not set each replica names itself after its container:
#    Docker's DNS maps the container's address back to its container name
#    (cm-computenode-gpu-1), the node is called computenode-gpu-1 and its
#    mover is advertised under the full container name, which every container
#    of the project resolves (CM_TRANSFER_HOST, unless set). The names stay
#    the same when containers are recreated. If that lookup fails, the
#    container's hostname (its short id, also resolvable) is the name.
# 2. Waits for the CurveZMQ keys the head node creates in CM_RUN_DIR/keys
#    (shared volume) unless CM_CURVE turns CurveZMQ off.
# 3. Runs the command (default: `cmdaemon node`).
set -eu

: "${CM_RUN_DIR:=/cm/run}"
export CM_RUN_DIR

# Prints this container's name as Docker's DNS knows it, or nothing.
container_name() {
    addr=$(getent ahostsv4 "$1" 2>/dev/null | { read -r a _ && echo "$a"; }) || return 0
    [ -n "$addr" ] || return 0
    fqdn=$(getent -s dns hosts "$addr" 2>/dev/null | { read -r _ n _ && echo "$n"; }) || return 0
    echo "${fqdn%%.*}"
}

if [ -z "${CM_NODE_NAME:-}" ]; then
    host=${HOSTNAME:-$(cat /etc/hostname)}
    cname=$(container_name "$host")
    case "$cname" in
        "")
            CM_NODE_NAME=$host ;;
        *computenode-*)
            CM_NODE_NAME="computenode-${cname##*computenode-}"
            : "${CM_TRANSFER_HOST:=$cname}" ;;
        *)
            CM_NODE_NAME=$cname ;;
    esac
    export CM_NODE_NAME
fi
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

echo "cm-entrypoint: node $CM_NODE_NAME, partition ${CM_PARTITION:-default}," \
    "mover at ${CM_TRANSFER_HOST:-$CM_NODE_NAME}:${CM_TRANSFER_PORT:-7818}" >&2
exec "$@"
