#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the
# workspace (real FUSE mounts, real fio, real Docker).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# A clean build of the workspace and its tests takes about 3 GB (more while
# linking); a disk that fills mid-link shows up as a linker "Bus error", so
# say it plainly first.
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target"
free_kb=$(df -Pk "$target" 2>/dev/null | awk 'NR==2 {print $4}' || true)
if [[ -n "$free_kb" ]] && ((free_kb < 5 * 1024 * 1024)); then
    echo "test: only $((free_kb / 1024)) MB free under $target; a clean build needs about 3 GB, 5 GB to be safe" >&2
fi
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
# The delta reader and apply, fuzzed for 30 s more (the run above gives them
# 5). `--workspace`, not `-p volfs`: the same features as the build above,
# so nothing is compiled again.
VOLFS_FUZZ_SECS=30 cargo test --workspace --test fuzz_delta
