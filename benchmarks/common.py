"""Helpers shared by the benchmark scripts: a real `mlops serve` on 127.0.0.1, started and awaited the same way."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MLOPS = Path(sys.executable).parent / "mlops"


def start_serve(args: list[str], env: dict[str, str], log: Path, seconds: float = 600) -> tuple[subprocess.Popen, str]:
    """Start `mlops serve` with ``args`` on a free loopback port; return it and its URL once /ready answers 200.

    Raises SystemExit naming the log when the server exits or is not ready within ``seconds`` (a benchmark stops).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([str(MLOPS), "serve", "--port", str(port), *args], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server not ready in {seconds:.0f} s; see {log}")
