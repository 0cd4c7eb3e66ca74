#!/usr/bin/env bash
# The Docker cluster, as make runs it (see docker-compose.yml):
#
#   docker/cluster.sh up              images (docker/images.sh), compose up, wait until 4 nodes are IDLE
#   docker/cluster.sh stop            compose down: no container or network left; drive/ is kept
#   docker/cluster.sh exec [USER]     a shell on the head node (root, or USER in /home/USER)
#   docker/cluster.sh adduser USER    a user on every node (drive/etc: passwd, group, shadow, gshadow),
#                                     home drive/home/USER: root's `su - USER` works on every node
#
# COMPOSE_PROJECT_NAME (default cm) names the containers, the network and the image tag.
set -euo pipefail

cd "$(dirname "$0")/.."
PROJECT=${COMPOSE_PROJECT_NAME:-cm}
UP_TIMEOUT=${CM_UP_TIMEOUT:-300}
NODES=(computenode-gpu-1 computenode-gpu-2 computenode-cpu-1 computenode-cpu-2)
IMAGES_ENV=.build/docker/images.env

die() { echo "make: $*" >&2; exit 1; }

compose() {
    local files=(-f docker-compose.yml)
    [ -f "$IMAGES_ENV" ] && grep -q '^CM_DB=ferretdb' "$IMAGES_ENV" && files+=(-f docker/compose.ferretdb.yml)
    local envf=()
    [ -f "$IMAGES_ENV" ] && envf=(--env-file "$IMAGES_ENV")
    docker compose -p "$PROJECT" "${envf[@]}" "${files[@]}" "$@"
}

need_engine() {
    timeout 20 docker info >/dev/null 2>&1 ||
        die "no Docker engine here: 'make engine' (root) installs and starts one, or 'make local-up' runs the same cluster as local processes"
}

# drive/etc/passwd, group, shadow and gshadow: seeded from the image's own, then `make adduser` appends.
# su and login (PAM's pam_unix) need a user's shadow entry as much as its passwd one: a drive made before
# shadow was seeded gets one for each user it lacks.
seed_users() {
    mkdir -p drive/etc
    local f
    for f in passwd group shadow gshadow; do
        if [ ! -s "drive/etc/$f" ]; then
            docker run --rm --entrypoint cat "$1" "/etc/$f" >"drive/etc/$f.tmp" || die "cannot read /etc/$f of $1"
            mv "drive/etc/$f.tmp" "drive/etc/$f"
        fi
    done
    local name
    for name in $(cut -d: -f1 drive/etc/passwd); do
        grep -q "^$name:" drive/etc/shadow || shadow_entry "$name" >>drive/etc/shadow
    done
    for name in $(cut -d: -f1 drive/etc/group); do
        grep -q "^$name:" drive/etc/gshadow || echo "$name:!::" >>drive/etc/gshadow
    done
    local shadow_gid
    shadow_gid=$(awk -F: '$1 == "shadow" {print $3}' drive/etc/group)
    chown "0:${shadow_gid:-0}" drive/etc/shadow drive/etc/gshadow
    chmod 0640 drive/etc/shadow drive/etc/gshadow
}

# no password (`*`: nobody logs in with one; root's `su - USER` needs none), changed today, never expires
shadow_entry() { echo "$1:*:$(( $(date +%s) / 86400 )):0:99999:7:::"; }

nodes_idle() {  # prints "N idle of 4", exit 0 when all are
    compose exec -T headnode cminfo --json 2>/dev/null | python3 -c '
import json, sys
want = sys.argv[1:]
try:
    nodes = {n["name"]: n["state"] for n in json.load(sys.stdin)["nodes"]}
except ValueError:
    nodes = {}
idle = [n for n in want if nodes.get(n) == "IDLE"]
print(f"{len(idle)} of {len(want)} nodes IDLE")
sys.exit(0 if len(idle) == len(want) else 1)' "${NODES[@]}"
}

up() {
    need_engine
    bash docker/engine.sh compose
    CM_IMAGE_TAG=$PROJECT bash docker/images.sh
    # shellcheck disable=SC1090
    . "$IMAGES_ENV"
    mkdir -p drive/run/docker drive/db/mongo drive/db/ferretdb drive/db/socket drive/home drive/data/gpu drive/data/cpu
    chmod 0700 drive/db/socket  # the database's socket: root's alone (the containers chown it to root too)
    chmod 1777 drive/data/gpu drive/data/cpu  # scratch-like: every user makes their own folders
    seed_users "$CM_IMAGE"
    local t0=$SECONDS status
    compose up -d --wait --wait-timeout "$UP_TIMEOUT" --remove-orphans >/dev/null 2>.build/docker/up.log ||
        die "the cluster did not come up healthy: $(grep -v '^ *Container' .build/docker/up.log | tail -n1) (docker compose -p $PROJECT logs; make stop cleans up)"
    until status=$(nodes_idle); do
        [ $((SECONDS - t0)) -lt "$UP_TIMEOUT" ] || die "the cluster did not come up in ${UP_TIMEOUT} s: $status"
        sleep 1
    done
    cat <<MSG
cluster $PROJECT up in $((SECONDS - t0)) s: head + ${#NODES[@]} compute nodes, $status (partitions gpu, cpu)
  make exec-head              a shell on the head node (as root): cminfo, cmrun, cmsync, cmkill
  make adduser USER=alice     add a user to every node, then: make exec-head USER=alice
  make stop                   stop it; drive/ (homes, data, the database) is kept
MSG
}

stop() {
    timeout 20 docker info >/dev/null 2>&1 || { echo "no Docker engine here: nothing to stop"; return 0; }
    docker compose version >/dev/null 2>&1 || die "no docker compose: nothing of the cluster can be running"
    mkdir -p .build/docker
    compose down --remove-orphans --timeout 20 >/dev/null 2>.build/docker/down.log ||
        die "docker compose down failed: $(tail -n1 .build/docker/down.log)"
    local left
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"; \
           docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [ -z "$left" ] || die "containers or networks of project $PROJECT are left: $left"
    echo "cluster $PROJECT stopped: no container, no network left; drive/ kept"
}

exec_head() {
    need_engine
    local user=${1:-root} tty=()
    [ -t 0 ] || tty=(-T)  # commands piped in: no terminal to give the shell
    if [ "$user" = root ]; then
        compose exec "${tty[@]}" headnode bash
    else
        local ids
        # by number: the engine looks names up in the image's /etc/passwd, not in the drive/etc one mounted over it
        ids=$(awk -F: -v u="$user" '$1 == u {print $3 ":" $4; f=1} END {exit !f}' drive/etc/passwd 2>/dev/null) ||
            die "no user $user: make adduser USER=$user first"
        compose exec "${tty[@]}" -u "$ids" -w "/home/$user" -e "HOME=/home/$user" -e "USER=$user" -e "LOGNAME=$user" headnode bash
    fi
}

adduser() {
    local user=${1:-}
    [ -n "$user" ] || die "which user? make adduser USER=name"
    [[ "$user" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "bad user name '$user' (lower case letters, digits, _ and -)"
    [ -s drive/etc/passwd ] && [ -s drive/etc/shadow ] || die "drive/etc has no passwd or shadow yet: run make first"
    local uid
    exec 9>drive/etc/.lock
    flock -w 10 9 || die "drive/etc is locked by another make adduser"
    if uid=$(awk -F: -v u="$user" '$1 == u {print $3; f=1} END {exit !f}' drive/etc/passwd); then
        echo "user $user exists (uid $uid), home drive/home/$user"
        return 0
    fi
    grep -q "^$user:" drive/etc/group && die "a group named $user exists already"
    uid=$(awk -F: '$3 >= 2000 && $3 < 60000 {print $3}' drive/etc/passwd drive/etc/group | sort -n | tail -n1)
    uid=$(( ${uid:-1999} + 1 ))
    # appended in place: the files are bind-mounted (their directory) into every running container
    echo "$user:x:$uid:$uid::/home/$user:/bin/bash" >>drive/etc/passwd
    echo "$user:x:$uid:" >>drive/etc/group
    shadow_entry "$user" >>drive/etc/shadow
    echo "$user:!::" >>drive/etc/gshadow
    mkdir -p "drive/home/$user"
    chown "$uid:$uid" "drive/home/$user"
    chmod 0750 "drive/home/$user"
    echo "user $user added to every node (uid $uid), home drive/home/$user; make exec-head USER=$user"
}

case "${1:-}" in
    up) up ;;
    stop) stop ;;
    exec) exec_head "${2:-}" ;;
    adduser) adduser "${2:-}" ;;
    *) die "usage: docker/cluster.sh up|stop|exec [USER]|adduser USER" ;;
esac
