#!/bin/sh
# Healthchecks of the Docker cluster (docker-compose.yml):
#   cm-health head   the head answers a client on its socket
#   cm-health node   the head lists this node (name from the entrypoint) and not as DOWN/UNKNOWN
#   cm-health db     the database answers ping on its socket (the embedded server's container)
set -eu
case "${1:-}" in
    head)
        exec cminfo >/dev/null ;;
    node)
        name=$(cat /run/cm-node-name)
        cminfo --json | python3 -c '
import json, sys
nodes = {n["name"]: n["state"] for n in json.load(sys.stdin)["nodes"]}
state = nodes.get(sys.argv[1])
sys.exit(0 if state not in (None, "DOWN", "UNKNOWN") else "node %s: %s" % (sys.argv[1], state or "not registered"))
' "$name" ;;
    db)
        exec python3 -c 'from cm.cluster.db import ping; ping("mongodb://%2Fcm%2Fdb%2Fdb.sock/", timeout=3)' ;;
    *)
        echo "usage: cm-health head|node|db" >&2; exit 2 ;;
esac
