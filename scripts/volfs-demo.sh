#!/usr/bin/env bash
# volfs on its own: a volume mounted with volfs is
# written to, shipped to a second "edge" directory as a full delta, changed,
# and then only the change is shipped; both sides end with the same root hash.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
cargo build --release -q -p volfs
volfs=$PWD/target/release/volfs

work=$(mktemp -d /tmp/edgeshift-demo.XXXXXX)
edge_a=$work/edge-a/volume mnt=$work/edge-a/mnt edge_b=$work/edge-b/volume
mkdir -p "$edge_a" "$mnt" "$edge_b"
cleanup() {
    [[ -n ${pid:-} ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    umount -l "$mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }

say "mount a volume on edge A ($mnt)"
"$volfs" mount "$edge_a" "$mnt" 2>"$work/volfs.log" & pid=$!
for _ in $(seq 100); do [[ -S $edge_a/.volfs/volume.sock ]] && break; sleep 0.05; done

say "the app writes its state: a to-do list and a 20 MiB dataset"
printf 'buy milk\nwrite thesis\n' >"$mnt/todo.txt"
head -c $((20 << 20)) /dev/urandom >"$mnt/dataset.bin"
"$volfs" status "$edge_a"

say "pre-copy: full delta to edge B"
"$volfs" diff "$edge_a" -o "$work/round1.delta"
"$volfs" apply "$edge_b" "$work/round1.delta"
ls -l "$work/round1.delta"

say "the app keeps running: one line added, 3 bytes patched in the dataset"
echo 'move to the next edge' >>"$mnt/todo.txt"
printf 'abc' | dd of="$mnt/dataset.bin" bs=1 seek=$((7 << 20)) conv=notrunc status=none
"$volfs" status "$edge_a"

say "handover: only the final dirty delta crosses"
"$volfs" manifest "$edge_b" -o "$work/b.manifest"
"$volfs" diff "$edge_a" -o "$work/final.delta" --base "$work/b.manifest"
"$volfs" apply "$edge_b" "$work/final.delta"
ls -l "$work/final.delta"

say "both edges hold the same volume"
kill -TERM "$pid"; wait "$pid"; pid=
echo "edge A: $("$volfs" hash "$edge_a")"
echo "edge B: $("$volfs" hash "$edge_b")"
"$volfs" verify "$edge_b"
cat "$edge_b/todo.txt"
