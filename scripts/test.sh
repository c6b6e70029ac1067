#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the
# workspace (real FUSE mounts, real fio, real Docker).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
# The delta reader and apply, fuzzed for 30 s more (the run above gives them 5).
VOLFS_FUZZ_SECS=30 cargo test -p volfs --test fuzz_delta
