"""`mlops download` against a real HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlops.cli import app


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/broken"):
            self.send_error(500, "simulated server failure")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """Serve a small archive from a temp folder; yields (base URL, archive path, its SHA-256)."""
    root = tmp_path / "www"
    root.mkdir()
    archive = root / "Task04_Hippocampus.tar"
    archive.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, several chunks
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", archive, hashlib.sha256(archive.read_bytes()).hexdigest()
    finally:
        httpd.shutdown()
        httpd.server_close()


def _download(cli: CliRunner, url: str, dest: Path, sha: str) -> object:
    return cli.invoke(app, ["download", f"dataset.url={url}", f"dataset.sha256={sha}", "--dest", str(dest)])


def test_checksum_match(server: tuple[str, Path, str], tmp_path: Path, cli: CliRunner) -> None:
    base, archive, sha = server
    dest = tmp_path / "dl" / "Task04_Hippocampus.tar"
    result = _download(cli, f"{base}/Task04_Hippocampus.tar", dest, sha)
    assert result.exit_code == 0, result.output
    assert dest.read_bytes() == archive.read_bytes()
    assert not dest.with_name(dest.name + ".part").exists()
    again = _download(cli, f"{base}/Task04_Hippocampus.tar", dest, sha)  # verified, not fetched again
    assert again.exit_code == 0 and "already downloaded" in again.output


def test_checksum_mismatch_keeps_nothing(server: tuple[str, Path, str], tmp_path: Path, cli: CliRunner) -> None:
    base, _, _ = server
    dest = tmp_path / "dl" / "Task04_Hippocampus.tar"
    result = _download(cli, f"{base}/Task04_Hippocampus.tar", dest, "0" * 64)
    assert result.exit_code == 1
    assert "SHA-256 mismatch" in result.output
    assert list(dest.parent.iterdir()) == []


def test_server_error_keeps_nothing(server: tuple[str, Path, str], tmp_path: Path, cli: CliRunner) -> None:
    base, _, sha = server
    dest = tmp_path / "dl" / "Task04_Hippocampus.tar"
    result = _download(cli, f"{base}/broken/Task04_Hippocampus.tar", dest, sha)
    assert result.exit_code == 1
    assert "HTTP 500" in result.output
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


def test_unreachable_server(tmp_path: Path, cli: CliRunner) -> None:
    dest = tmp_path / "Task04_Hippocampus.tar"
    result = _download(cli, "http://127.0.0.1:9/Task04_Hippocampus.tar", dest, "0" * 64)
    assert result.exit_code == 1
    assert "download failed" in result.output
    assert not dest.exists()


def test_configured_checksum_is_the_decathlon_one() -> None:
    from mlops.config import load_config

    cfg = load_config()
    assert cfg.dataset.sha256 == "282d808a3e84e5a52f090d9dd4c0b0057b94a6bd51ad41569aef5ff303287771"
    assert cfg.dataset.url.endswith("Task04_Hippocampus.tar")
