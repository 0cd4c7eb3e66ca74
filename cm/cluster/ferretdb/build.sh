#!/usr/bin/env bash
# Builds .build/bin/cm-ferretdb, the embedded MongoDB-compatible database
# server (FerretDB v1.24.2, SQLite backend) from main.go in this directory.
#
# FerretDB's source is copied from the Go module cache into
# .build/ferretdb/src, patched with pushdown.patch, and the main module is
# built from a copy in .build/ferretdb/main whose go.mod replaces FerretDB with
# the patched copy. The committed go.mod/go.sum are never modified.
#
# Needs only Go (>= 1.24, or GOTOOLCHAIN=auto) and a Go module proxy.
# Does nothing when the binary is newer than all its inputs; --force rebuilds.
set -euo pipefail

FERRETDB_MODULE=github.com/FerretDB/FerretDB
FERRETDB_VERSION=v1.24.2

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
root="$(cd "$here/../../.." && pwd -P)"
build="$root/.build/ferretdb"
bin="$root/.build/bin/cm-ferretdb"
inputs=(main.go go.mod go.sum pushdown.patch build.sh)

die() {
    echo "cm-ferretdb build: error: $*" >&2
    exit 1
}

if [[ "${1:-}" != "--force" && -x "$bin" ]]; then
    stale=
    for f in "${inputs[@]}"; do
        [[ "$here/$f" -nt "$bin" ]] && stale=1
    done
    if [[ -z "$stale" ]]; then
        echo "cm-ferretdb is up to date: $bin"
        exit 0
    fi
fi

command -v go >/dev/null 2>&1 || die "'go' not found on PATH; install Go >= 1.24 (https://go.dev/dl/)"

export GOWORK=off
export CGO_ENABLED=0 # modernc.org/sqlite is pure Go: a static binary, no C compiler needed
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod"

echo "building cm-ferretdb (FerretDB $FERRETDB_VERSION + pushdown.patch) ..."

cd "$here"
version="$(go list -m -f '{{.Version}}' "$FERRETDB_MODULE")" ||
    die "cannot resolve $FERRETDB_MODULE from $here/go.mod"
[[ "$version" == "$FERRETDB_VERSION" ]] ||
    die "go.mod requires $FERRETDB_MODULE $version but pushdown.patch is for $FERRETDB_VERSION; update both (and FERRETDB_VERSION in build.sh)"

go mod download "$FERRETDB_MODULE" ||
    die "cannot download $FERRETDB_MODULE@$FERRETDB_VERSION (is the Go module proxy reachable? GOPROXY=$(go env GOPROXY))"
modsrc="$(go list -m -f '{{.Dir}}' "$FERRETDB_MODULE")"
[[ -n "$modsrc" && -f "$modsrc/go.mod" ]] || die "$FERRETDB_MODULE@$FERRETDB_VERSION is not in the module cache after download"

# fresh patched copy of FerretDB's source (module cache files are read-only)
mkdir -p "$build" "$(dirname "$bin")"
rm -rf "$build/src.tmp"
cp -R "$modsrc" "$build/src.tmp"
chmod -R u+w "$build/src.tmp"
if command -v patch >/dev/null 2>&1; then
    patch -p1 -s --forward --fuzz=0 --no-backup-if-mismatch -d "$build/src.tmp" <"$here/pushdown.patch" ||
        die "pushdown.patch does not apply to $FERRETDB_MODULE@$FERRETDB_VERSION"
elif command -v git >/dev/null 2>&1; then
    # the ceiling keeps git from treating the enclosing cm repository as the patch root
    (cd "$build/src.tmp" && GIT_CEILING_DIRECTORIES="$build" git apply -p1 "$here/pushdown.patch") ||
        die "pushdown.patch does not apply to $FERRETDB_MODULE@$FERRETDB_VERSION"
else
    die "need 'patch' or 'git' to apply pushdown.patch"
fi
rm -rf "$build/src"
mv "$build/src.tmp" "$build/src"

# copy of the main module, FerretDB replaced by the patched copy
rm -rf "$build/main"
mkdir -p "$build/main"
cp "$here/main.go" "$here/go.mod" "$here/go.sum" "$build/main/"
cd "$build/main"
go mod edit -replace "$FERRETDB_MODULE=../src"
go build -buildvcs=false -trimpath -tags ferretdb_no_postgresql -ldflags '-s -w' -o "$bin.tmp" . ||
    die "go build failed (see above)"
mv -f "$bin.tmp" "$bin"

"$bin" -h >/dev/null 2>&1 || [[ $? -eq 2 ]] || die "built binary $bin does not run"
echo "built $bin"
