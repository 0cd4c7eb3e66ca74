#!/usr/bin/env bash
# make demo: start a local cluster, run one command job and one sync job, show cminfo and cmlogs/, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PY=$ROOT/.venv/bin/python  # absolute: the demo cds into drive/home/demo, and the exit trap runs there

cleanup() {
  "$PY" -m cm.cluster.local down --run-dir "$ROOT/drive/run" >/dev/null ||
    echo "demo: could not stop the local cluster; run 'make local-down'" >&2
}
trap cleanup EXIT

echo "== starting a local cluster (head + 4 compute nodes: gpu x2, cpu x2)"
"$PY" -m cm.cluster.local up --run-dir "$ROOT/drive/run"
. drive/run/cm.env

mkdir -p drive/home/demo
cd drive/home/demo

echo
echo "== cmrun -n 2 -p 2 --partition cpu --wait: a command job on two nodes, two processes each"
JOB=$(cmrun -n 2 -p 2 --partition cpu -J hello --wait --parsable \
  sh -c 'echo "rank $CM_PROC_RANK of job $CM_JOB_ID on $CM_NODENAME ($CM_NODELIST)"')
cat cmlogs/"$JOB"/*/*.out

echo
echo "== cmsync --wait gpu:/demo cpu:/demo: a sync job between the partitions' storage"
DATA=../../data
rm -rf "$DATA/gpu/demo" "$DATA/cpu/demo"
mkdir -p "$DATA/gpu/demo/small"
head -c 64M /dev/urandom > "$DATA/gpu/demo/big.bin"
for i in $(seq 1 200); do head -c $((4096 + i * 37)) /dev/urandom > "$DATA/gpu/demo/small/f$i"; done
ln -s big.bin "$DATA/gpu/demo/link-to-big"
cmsync --wait gpu:/demo cpu:/demo
if diff -r --no-dereference "$DATA/gpu/demo" "$DATA/cpu/demo" >/dev/null; then
  echo "trees are identical"
else
  echo "trees differ!"; exit 1
fi

echo
echo "== cminfo"
cminfo

echo
echo "== job output is in cmlogs/ under the working directory: $(pwd)/cmlogs"
find cmlogs -type f | sort | head -20
echo
echo "== stopping the cluster"
