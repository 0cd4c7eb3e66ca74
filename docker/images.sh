#!/usr/bin/env bash
# Builds the images of the Docker cluster, with or without a registry, and
# writes .build/docker/images.env (CM_IMAGE, CM_DB_IMAGE, CM_DB) for compose.
#
#   registry: python:3.11-slim and mongo:7 (pulled, or already in the engine)
#   offline:  when python:3.11-slim cannot be pulled, or OFFLINE=1: a Debian
#             bookworm root file system made by debootstrap from Debian's
#             packages, imported as the base image (kept in the engine);
#             and when mongo:7 cannot be had, the embedded FerretDB server
# Both paths install Python packages only from a wheelhouse made on the host
# with `pip wheel` (kept in ~/.cache/cm/wheels/<hash of the dependencies>).
# Prints one line saying which path it took. Layers are cached by the engine:
# only what changed is rebuilt.
#
#   docker/images.sh systemd   prints the name of an image whose PID 1 is systemd, on the debootstrap
#                              base (docker/systemd.Dockerfile; tests/test_guide.py), built if missing
set -euo pipefail

cd "$(dirname "$0")/.."
TAG=${CM_IMAGE_TAG:-latest}
OFFLINE=${OFFLINE:-0}
CACHE=${CM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cm}
OUT=.build/docker
PY_IMAGE=python:3.11-slim
MONGO_IMAGE=mongo:7
BASE_PACKAGES=python3,python3-venv,procps
BASE_IMAGE=cm-cluster/base:bookworm-$(echo "$BASE_PACKAGES" | sha1sum | cut -c1-8)
CM_IMAGE=cm-cluster/cm:$TAG
FERRETDB_IMAGE=cm-cluster/ferretdb:$TAG
PULL_TIMEOUT=${CM_PULL_TIMEOUT:-30}

die() { echo "docker/images.sh: $*" >&2; exit 1; }
log() { echo "docker/images.sh: $*" >&2; }
offline() { case "$OFFLINE" in 1 | yes | true) return 0 ;; esac; return 1; }

# An image present in the engine, or pulled within PULL_TIMEOUT seconds; never with OFFLINE=1.
have_image() {
    offline && return 1
    docker image inspect "$1" >/dev/null 2>&1 && return 0
    timeout "$PULL_TIMEOUT" docker pull -q "$1" >/dev/null 2>&1
}

debian_mirror() {
    local m
    m=$(grep -rhoE 'https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -n1 | tr -d ' ')
    echo "${m:-http://deb.debian.org/debian}"
}

build_base() {
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
    local tarball=$CACHE/${BASE_IMAGE##*:}.tar root=$CACHE/rootfs.tmp t0=$SECONDS
    if [ ! -s "$tarball" ]; then
        [ "$(id -u)" = 0 ] || die "debootstrap needs root to make the base image $BASE_IMAGE"
        if ! command -v debootstrap >/dev/null 2>&1; then
            log "installing debootstrap (Debian package)"
            { timeout 300 apt-get update -qq >/dev/null &&
              DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq debootstrap >/dev/null; } ||
                die "cannot install debootstrap (Debian package)"
        fi
        rm -rf "$root"
        mkdir -p "$root"
        log "making a Debian bookworm root file system with debootstrap ($BASE_PACKAGES)"
        timeout 900 debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$root" "$(debian_mirror)" \
            >"$CACHE/debootstrap.log" 2>&1 || { rm -rf "$root"; die "debootstrap failed; see $CACHE/debootstrap.log"; }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        # kept beside the engine: an engine whose images were pruned imports it again, no debootstrap
        tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
    fi
    docker import - "$BASE_IMAGE" <"$tarball" >/dev/null || die "docker import of $tarball failed"
    log "base image $BASE_IMAGE made in $((SECONDS - t0)) s"
}

# The wheelhouse: every dependency of cm (and setuptools/wheel to install cm) as
# wheels for this Python, built once per set of dependencies.
build_wheels() {
    local reqs key dir
    reqs=$(python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"));
print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))')
    key=$( (echo "$reqs"; python3 -c 'import sys; print(sys.version_info[:2])') | sha1sum | cut -c1-12)
    dir=$CACHE/wheels/$key
    if [ ! -f "$dir/requirements.txt" ]; then
        log "making the wheelhouse ($dir)"
        rm -rf "$dir.tmp"
        mkdir -p "$dir.tmp"
        echo "$reqs" >"$dir.tmp/requirements.in"
        timeout 900 python3 -m pip wheel -q --disable-pip-version-check -w "$dir.tmp" -r "$dir.tmp/requirements.in" ||
            die "pip wheel failed (is PyPI or a pip cache at hand?)"
        mv "$dir.tmp/requirements.in" "$dir.tmp/requirements.txt"
        rm -rf "$dir"
        mv "$dir.tmp" "$dir"
    fi
    rm -rf "$OUT/wheels"
    mkdir -p "$OUT"
    cp -al "$dir" "$OUT/wheels" 2>/dev/null || cp -a "$dir" "$OUT/wheels"
}

# The embedded database server, built as for the local cluster, kept by its inputs' hash.
build_ferretdb() {
    local key dir=cm/cluster/ferretdb
    key=$(cat "$dir"/main.go "$dir"/go.mod "$dir"/go.sum "$dir"/pushdown.patch "$dir"/build.sh | sha1sum | cut -c1-12)
    if [ ! -x "$CACHE/ferretdb/$key/cm-ferretdb" ]; then
        bash "$dir/build.sh" >&2 || die "cannot build the embedded database server"
        mkdir -p "$CACHE/ferretdb/$key"
        cp .build/bin/cm-ferretdb "$CACHE/ferretdb/$key/cm-ferretdb"
    fi
    cp "$CACHE/ferretdb/$key/cm-ferretdb" "$OUT/cm-ferretdb"
}

build() {  # build IMAGE DOCKERFILE ARGS...
    local image=$1 file=$2 log
    shift 2
    log=$CACHE/build-$(echo "$image" | tr '/:' '--').log
    # the :cache tag keeps the last build's layers in the engine when a project's own tag is removed
    DOCKER_BUILDKIT=0 docker build -q -t "$image" -t "${image%:*}:cache" -f "$file" "$@" . >"$log" 2>&1 ||
        die "docker build of $image failed: $(tail -n1 "$log") (whole log: $log)"
}

command -v docker >/dev/null 2>&1 || die "no docker client"
mkdir -p "$CACHE" "$OUT"
if [ "${1:-}" = systemd ]; then
    build_base
    image=cm-cluster/systemd:$(cat docker/systemd.Dockerfile | sha1sum | cut -c1-8)-${BASE_IMAGE##*-}
    docker image inspect "$image" >/dev/null 2>&1 || build "$image" docker/systemd.Dockerfile --build-arg "BASE=$BASE_IMAGE"
    echo "$image"
    exit 0
fi
t0=$SECONDS
if have_image "$PY_IMAGE"; then
    base=$PY_IMAGE
    path="registry: $PY_IMAGE"
else
    build_base
    base=$BASE_IMAGE
    path="offline: Debian bookworm by debootstrap ($BASE_IMAGE)"
fi
if have_image "$MONGO_IMAGE"; then
    db=mongo
    db_image=$MONGO_IMAGE
    path="$path, database $MONGO_IMAGE"
else
    db=ferretdb
    db_image=$FERRETDB_IMAGE
    path="$path, database: embedded FerretDB ($FERRETDB_IMAGE)"
fi
build_wheels
build "$CM_IMAGE" docker/Dockerfile --build-arg "BASE=$base"
if [ "$db" = ferretdb ]; then
    build_ferretdb
    build "$FERRETDB_IMAGE" docker/ferretdb.Dockerfile --build-arg "CM_IMAGE=$CM_IMAGE"
fi
printf 'CM_IMAGE=%s\nCM_DB_IMAGE=%s\nCM_DB=%s\n' "$CM_IMAGE" "$db_image" "$db" >"$OUT/images.env"
echo "images ($path; Python packages from the host's wheelhouse) ready in $((SECONDS - t0)) s"
