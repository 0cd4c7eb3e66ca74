#!/bin/sh
# Entrypoint of the head node container.
#
# Makes sure the CurveZMQ keys exist in CM_RUN_DIR/keys (a volume shared with
# every compute node): the head's pair and the one `node` pair all compute
# nodes use (`cmdaemon keys` is idempotent: existing keys are kept), then runs
# the command (default: `cmdaemon head`).
set -eu

: "${CM_RUN_DIR:=/cm/run}"
export CM_RUN_DIR
mkdir -p "$CM_RUN_DIR"

cmdaemon keys >/dev/null
echo "cm-entrypoint: CurveZMQ keys ready in $CM_RUN_DIR/keys" >&2

exec "$@"
