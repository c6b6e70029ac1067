#!/usr/bin/python3
"""The List app's server half in Python (grpcio): the same `list.v1.List`
service as `list-app`, with its state in SQLite on the session's volume.

The whole contract between edged and an app, in any language:

- serve gRPC on the Unix socket `$EDGE_SOCKET_DIR/app.sock`;
- keep state under `$EDGE_DATA_DIR` (the session's volume: it moves with
  the session);
- stop on SIGTERM;
- under a warm standby (`EDGE_ACTIVATION` set), wait before touching the
  data: see `wait_until_active`.

The four small messages of list.proto are encoded by hand (protobuf's wire
format), so the app needs nothing but grpcio (Debian: python3-grpcio).
"""

import os
import select
import signal
import sqlite3
import sys
import threading
import time
from concurrent import futures

import grpc

MAX_ITEM = 4096


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf):
    """(field number, wire type, value) of a protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        else:
            raise ValueError("unsupported wire type")
        yield field, wire, value


def _read_varint(buf, i):
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _bytes_field(field, data):
    return _varint(field << 3 | 2) + _varint(len(data)) + data


class ListApp:
    def __init__(self, data_dir):
        self.db = sqlite3.connect(
            os.path.join(data_dir, "list.db"), check_same_thread=False
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, text TEXT NOT NULL)"
        )
        self.db.commit()
        self.lock = threading.Lock()

    def add(self, request, context):
        try:
            item = b"".join(v for f, w, v in _fields(request) if f == 1 and w == 2)
            text = item.decode("utf-8")
        except (ValueError, UnicodeDecodeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {e}")
        if not 1 <= len(item) <= MAX_ITEM:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"an item has 1 to {MAX_ITEM} bytes"
            )
        with self.lock:
            self.db.execute("INSERT INTO items (text) VALUES (?)", (text,))
            self.db.commit()
            (count,) = self.db.execute("SELECT count(*) FROM items").fetchone()
        return _varint(1 << 3 | 0) + _varint(count)

    def items(self, request, context):
        delay = 0
        try:
            for f, w, v in _fields(request):
                if f == 1 and w == 0:
                    delay = min(v, 60_000)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {e}")
        with self.lock:
            rows = [r[0] for r in self.db.execute("SELECT text FROM items ORDER BY id")]
        # The thesis's per-item work: the call takes longer the longer the list.
        time.sleep(delay * len(rows) / 1000)
        return b"".join(_bytes_field(1, r.encode("utf-8")) for r in rows)


def _serving(request, context):
    return _varint(1 << 3 | 0) + _varint(1)  # HealthCheckResponse{status: SERVING}


def wait_until_active():
    """A warm standby is started before its volume is there: read one byte
    from the FIFO `$EDGE_ACTIVATION`; b"1" means the volume is mounted at
    the data directory now, end of file means edged gave the standby up."""
    fifo = os.environ.pop("EDGE_ACTIVATION", None)  # not for child processes
    if not fifo:
        return
    data = os.environ["EDGE_DATA_DIR"]
    before = os.stat(data)
    # Opened without blocking (edged sees the app wait), then polled: a FIFO
    # no writer opened yet reads as end of file, poll waits for the byte.
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    p = select.poll()
    p.register(fd, select.POLLIN)
    while not p.poll():
        pass
    try:
        go = os.read(fd, 1)
    except BlockingIOError:
        go = b""
    os.close(fd)
    if go != b"1":
        sys.exit(0)
    after = os.stat(data)
    if (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino):
        sys.exit("activated, but the volume is not at " + data)
    os.chdir(data)


def main():
    wait_until_active()
    data_dir = os.environ["EDGE_DATA_DIR"]
    socket = os.path.join(os.environ["EDGE_SOCKET_DIR"], "app.sock")
    app = ListApp(data_dir)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    unary = grpc.unary_unary_rpc_method_handler  # raw bytes in and out
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "list.v1.List", {"Add": unary(app.add), "Items": unary(app.items)}
            ),
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health", {"Check": unary(_serving)}
            ),
        )
    )
    if os.path.exists(socket):
        os.unlink(socket)
    server.add_insecure_port("unix:" + socket)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()


if __name__ == "__main__":
    main()
