"""The load generator must count wrong replies as errors, not as throughput.

Runs bench/build/loadgen (built by ``python bench/run.py`` or here) against a
tiny in-process memcached that can be told to misbehave:
``python -m pytest bench/test_loadgen.py``.
"""

from __future__ import annotations

import json
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from run import build_loadgen


class FakeMemcached(socketserver.ThreadingTCPServer):
    """get/set over a dict; ``fault`` names one way to get replies wrong."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, fault: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.fault = fault
        self.data: dict[bytes, bytes] = {}


class Handler(socketserver.StreamRequestHandler):
    server: FakeMemcached

    def handle(self) -> None:
        fault = self.server.fault
        while line := self.rfile.readline():
            words = line.split()
            if words[0] == b"set":
                self.server.data[words[1]] = self.rfile.read(int(words[4]) + 2)[:-2]
                self.wfile.write(b"NOT_STORED\r\n" if fault == "not_stored" else b"STORED\r\n")
                continue
            out = []
            for key in words[1:]:
                value = self.server.data.get(key)
                if value is None or fault == "miss":
                    continue
                if fault == "corrupt":
                    value = value[:-1] + b"!"
                if fault == "other_key":
                    key = key[:-1] + bytes([key[-1] ^ 1])
                out.append(b"VALUE %s 0 %d\r\n%s\r\n" % (key, len(value), value))
            if fault == "garbage":
                out = [b"HELLO\r\n"]
            elif fault == "server_error":
                out = [b"SERVER_ERROR out of memory\r\n"]
            else:
                out.append(b"END\r\n")
            self.wfile.write(b"".join(out))


@contextmanager
def fake_memcached() -> Iterator[FakeMemcached]:
    server = FakeMemcached("none")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def loadgen(port: int, *args: str) -> dict:
    argv = [str(build_loadgen()), "--port", str(port), "--conns", "2", "--keys", "100",
            "--duration", "0.3", "--warmup", "0", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def run_against(fault: str, *args: str) -> dict:
    """Populate a well-behaved server, then load it with ``fault`` switched on."""
    with fake_memcached() as server:
        port = server.server_address[1]
        populated = loadgen(port, "--populate", "--conns", "1")
        assert populated["total_requests"] == 100 and populated["total_errors"] == 0
        server.fault = fault
        return loadgen(port, *args)


def test_correct_server_has_no_errors():
    result = run_against("none", "--multiget", "5", "--depth", "4")
    assert result["requests"] > 0
    assert result["total_errors"] == result["total_misses"] == 0
    assert result["closed_conns"] == 0


@pytest.mark.parametrize("fault", ["corrupt", "other_key", "server_error"])
def test_wrong_get_replies_are_errors(fault):
    result = run_against(fault, "--get-ratio", "1")
    assert result["errors"] == result["requests"] > 0


def test_unparseable_reply_closes_the_connection():
    result = run_against("garbage", "--get-ratio", "1")
    assert result["closed_conns"] == 2
    assert result["total_errors"] >= 2


def test_wrong_set_reply_is_an_error():
    result = run_against("not_stored", "--get-ratio", "0")
    assert result["errors"] == result["requests"] > 0


def test_misses_are_counted():
    result = run_against("miss", "--get-ratio", "1", "--multiget", "3")
    assert result["errors"] == 0
    assert result["misses"] == 3 * result["requests"] > 0
