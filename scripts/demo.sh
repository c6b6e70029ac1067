#!/usr/bin/env bash
# The main demo, on the embedded defaults: two edges on loopback with the
# process runtime; the List and Search apps opened as sessions over volfs
# volumes and called through their own generated gRPC stubs; the List
# session moves to the second edge with a call running.
# `scripts/volfs-demo.sh` shows the volume and its deltas on their own.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
cargo build --release -q -p volfs -p edgeshift-examples
exec ./target/release/edgeshift-demo
