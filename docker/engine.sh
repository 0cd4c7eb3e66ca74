#!/usr/bin/env bash
# The Docker engine and Compose v2 that `make` and CI need, installed from
# Debian packages and the Go module proxy when missing (no container registry).
#
#   docker/engine.sh install   docker.io (engine) and the Compose v2 CLI plugin, if missing
#   docker/engine.sh start     start dockerd (root) unless an engine already answers
#   docker/engine.sh stop      stop the dockerd that `start` started (pid file), nothing else
#   docker/engine.sh compose   only the Compose v2 plugin
#
# Compose v2 is built from its Go module (`go install module@version` refuses
# it: its go.mod has exclude directives), into ~/.docker/cli-plugins, kept
# across checkouts and CI runs. Every wait is bounded; errors are one line.
set -euo pipefail

COMPOSE_VERSION=v2.40.3
COMPOSE_MODULE=github.com/docker/compose/v2
CACHE=${CM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cm}
PLUGIN_DIR=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
PIDFILE=$CACHE/dockerd.pid
LOG=$CACHE/dockerd.log

die() { echo "docker/engine.sh: $*" >&2; exit 1; }
say() { echo "docker/engine.sh: $*" >&2; }

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

compose_v2() { timeout 10 docker compose version 2>/dev/null | grep -q 'v2\.'; }

install_engine() {
    command -v dockerd >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] || die "no Docker engine installed and not root: install docker.io (or Docker CE) first"
    command -v apt-get >/dev/null 2>&1 || die "no Docker engine installed and no apt-get to install docker.io"
    say "installing the Docker engine (Debian package docker.io; and debootstrap for offline images)"
    local t0=$SECONDS
    timeout 300 apt-get update -qq >/dev/null || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
        docker.io tini iptables debootstrap >/dev/null || die "apt-get install docker.io failed"
    say "docker.io installed in $((SECONDS - t0)) s"
}

install_compose() {
    compose_v2 && return 0
    command -v go >/dev/null 2>&1 || die "Compose v2 is missing and there is no Go toolchain to build it"
    say "building Compose $COMPOSE_VERSION from its Go module (about 2 minutes, once)"
    local t0=$SECONDS src work
    export GOFLAGS=-mod=mod GOWORK=off
    timeout 600 go mod download "$COMPOSE_MODULE@$COMPOSE_VERSION" ||
        die "cannot download $COMPOSE_MODULE@$COMPOSE_VERSION from the Go module proxy"
    src=$(go env GOMODCACHE)/$COMPOSE_MODULE@$COMPOSE_VERSION
    [ -f "$src/go.mod" ] || die "$src is not in the module cache after download"
    work=$CACHE/compose-src
    rm -rf "$work"
    mkdir -p "$CACHE" "$PLUGIN_DIR"
    cp -R "$src" "$work"
    chmod -R u+w "$work"
    (cd "$work" && CGO_ENABLED=0 timeout 900 go build -trimpath -buildvcs=false \
        -ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=$COMPOSE_VERSION" \
        -o "$PLUGIN_DIR/docker-compose.tmp" ./cmd) || die "go build of Compose $COMPOSE_VERSION failed"
    mv -f "$PLUGIN_DIR/docker-compose.tmp" "$PLUGIN_DIR/docker-compose"
    rm -rf "$work"
    compose_v2 || die "built $PLUGIN_DIR/docker-compose but 'docker compose version' does not answer v2"
    say "Compose $COMPOSE_VERSION installed in $PLUGIN_DIR in $((SECONDS - t0)) s"
}

start_engine() {
    engine_up && return 0
    command -v dockerd >/dev/null 2>&1 || die "no Docker engine installed: run 'make engine' (root) first"
    [ "$(id -u)" = 0 ] || die "the Docker engine is not running and only root can start it"
    mkdir -p "$CACHE"
    say "starting dockerd (log: $LOG)"
    # its own process group, so that the shell that started it can end without it
    setsid dockerd --storage-driver=overlay2 --pidfile /var/run/docker.pid >>"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    local i
    for i in $(seq 1 60); do
        engine_up && { say "dockerd answers (pid $(cat "$PIDFILE"))"; return 0; }
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || die "dockerd exited; last lines of $LOG: $(tail -n 3 "$LOG" | tr '\n' ' ')"
        sleep 1
    done
    die "dockerd did not answer in 60 s; see $LOG"
}

stop_engine() {
    [ -f "$PIDFILE" ] || { say "no dockerd started by this script"; return 0; }
    local pid i
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null && grep -q dockerd "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid"
        for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        say "dockerd (pid $pid) stopped"
    fi
    rm -f "$PIDFILE"
}

case "${1:-}" in
    install) install_engine; install_compose ;;
    compose) install_compose ;;
    start) start_engine ;;
    stop) stop_engine ;;
    *) die "usage: docker/engine.sh install|compose|start|stop" ;;
esac
