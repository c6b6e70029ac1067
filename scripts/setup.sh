#!/usr/bin/env bash
# Installs what edgeshift's tests, demo and benchmarks need on a Debian
# machine, and starts a Docker engine when none answers. Idempotent.
set -euo pipefail

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v fio >/dev/null || need+=(fio)
command -v rsync >/dev/null || need+=(rsync)
command -v bindfs >/dev/null || need+=(bindfs)
command -v setpriv >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
command -v dockerd >/dev/null || need+=(docker.io)
[[ -e /usr/share/dict/words ]] || need+=(wamerican)
/usr/bin/python3 -c 'import grpc' 2>/dev/null || need+=(python3-grpcio)
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [[ ! -e /dev/fuse ]]; then
    modprobe fuse 2>/dev/null || true
fi
[[ -e /dev/fuse ]] || { echo "setup: /dev/fuse is missing; FUSE tests cannot run" >&2; exit 1; }

# A Docker engine for the container runtime tests.
if ! docker info >/dev/null 2>&1; then
    echo "setup: starting dockerd"
    mkdir -p /var/log
    nohup dockerd >/var/log/edgeshift-dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start; see /var/log/edgeshift-dockerd.log" >&2; tail -20 /var/log/edgeshift-dockerd.log >&2; exit 1; }
fi
