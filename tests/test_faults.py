"""Faults around the service: stalled and endless uploads, a per-request time limit, clients that disconnect, and
SIGTERM while a prediction runs. One real `mlops serve` on 127.0.0.1 with small limits, so the faults are quick.

Each test asserts the status (or the closed connection), that a good request still succeeds, that the server's
peak RSS stayed under the bound stated in test_hostile, and that the log holds no traceback and no voxel data.
"""

from __future__ import annotations

import gzip
import re
import select
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import TrainedModel
from .test_hostile import Server, assert_survives, post, start_server, volume

UPLOAD_TIMEOUT_S = 3
TIME_LIMIT_S = 2  # above a 16³ volume at the model's spacing (the good request), below the slow ones
MAX_BYTES = 3_000_000


@pytest.fixture(scope="module")
def server(trained_synth: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(
        trained_synth,
        tmp_path_factory.mktemp("faults_tmp"),
        f"serve.upload_timeout_s={UPLOAD_TIMEOUT_S}",
        f"serve.timeout_s={TIME_LIMIT_S}",
        f"serve.max_upload_bytes={MAX_BYTES}",
        "serve.max_in_flight=2",
        "serve.shutdown_grace_s=8",
    )


@pytest.fixture(scope="module")
def good_case() -> bytes:
    return gzip.compress(volume())  # one tile: well inside the time limit


def raw_request(server: Server, head: bytes, chunks: list[bytes], read_timeout: float = 30) -> bytes:
    """Send ``head`` then ``chunks`` over a plain socket, and return what the server answers."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered (and will close): stop sending, read the answer
                sock.sendall(chunk)
        except OSError:  # the server answered and closed while we were still sending
            pass
        answer = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            answer += data
        return answer


def multipart_head(path: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n"
    ).encode()


PART = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="x.nii.gz"\r\n\r\n'


def test_chunked_upload_without_length_cut_at_limit(server: Server, good_case: bytes) -> None:
    """No Content-Length: the body is counted as it streams and refused at the limit, not spooled in full."""
    chunk = b"\0" * 1_000_000
    body = [f"{len(PART):x}\r\n".encode() + PART + b"\r\n"]
    body += [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 50  # 50 MB offered
    t0 = time.monotonic()
    answer = raw_request(server, multipart_head("/predict", "Transfer-Encoding: chunked\r\n"), body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"above the limit" in answer and b"connection: close" in answer.lower()
    assert time.monotonic() - t0 < 30
    assert_survives(server, good_case)


def test_stalled_upload_gets_408_and_is_closed(server: Server, good_case: bytes) -> None:
    """Content-Length announced, part of the body sent, then silence: 408 after serve.upload_timeout_s."""
    t0 = time.monotonic()
    head = multipart_head("/predict", "Content-Length: 100000\r\n")
    answer = raw_request(server, head, [PART + b"\0" * 1000])
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"upload incomplete" in answer
    assert UPLOAD_TIMEOUT_S - 0.5 <= time.monotonic() - t0 < UPLOAD_TIMEOUT_S + 10  # and the connection was closed
    assert_survives(server, good_case)


def test_time_limit_and_disconnect_free_their_slots(server: Server, good_case: bytes) -> None:
    """A slow request holds the model; one queued behind it passes the time limit (503), one whose client hangs up
    is cancelled (499, nobody reads it). Both slots come back: the next request succeeds."""
    # 128³ at the model's grid: about 140 tiles, several seconds even for the batched engine, within the budget
    slow = volume(spacing=8.0)
    with ThreadPoolExecutor(2) as pool:
        t0 = time.monotonic()
        first = pool.submit(post, server, "slow.nii", slow)
        time.sleep(0.5)
        queued = pool.submit(post, server, "queued.nii", slow)
        first_resp, queued_resp = first.result(), queued.result()
        first_s = time.monotonic() - t0
    # The engine polls `cancel` between tiles (the first is cut at the limit); an engine that does not still cannot
    # start the queued one before its limit has passed.
    assert first_resp.status_code in (200, 503), first_resp.text
    assert first_s > TIME_LIMIT_S, "the slow request was not slow: the test proves nothing"
    assert queued_resp.status_code == 503, queued_resp.text
    assert "time limit" in queued_resp.json()["detail"]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server, "slow.nii", slow)
        time.sleep(0.5)
        with pytest.raises(httpx.ReadTimeout):
            post(server, "gone.nii", slow, timeout=1.0)  # the client gives up and disconnects
        running.result()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "client disconnected" not in server.log.read_text():
        time.sleep(0.5)
    log = server.log.read_text()
    assert re.search(r"request [0-9a-f]{8}: client disconnected", log) and "gone.nii" not in log  # no upload names
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "mlops_predict_in_flight 0.0" not in httpx.get(f"{server.url}/metrics").text:
        time.sleep(0.5)
    assert "mlops_predict_in_flight 0.0" in httpx.get(f"{server.url}/metrics").text
    assert_survives(server, good_case)


def test_sigterm_drains_within_grace(server: Server, good_case: bytes) -> None:
    """SIGTERM during a prediction: no new connections, the running one finishes (or is cancelled), exit < 10 s.
    (Last test of the module: it stops the module's server.)"""
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server, "during.nii", volume(spacing=8.0))  # still running at SIGTERM
        time.sleep(1.0)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        resp = running.result()
        server.proc.wait(timeout=15)
        elapsed = time.monotonic() - t0
    assert resp.status_code in (200, 503), resp.text
    assert elapsed < 10, f"exit took {elapsed:.1f} s"
    assert server.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)
    log = server.log.read_text()
    assert "in-flight work has 8 s to finish" in log
    assert "Traceback" not in log
