"""job.run.push: a verified export with its model card goes to the hub through huggingface_hub; every refusal is
one line, exit 2, and the token is never written anywhere."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi, constants

from job.cli import cli
from job.core import checkpoints, run_files
from job.core.config import RunConfig
from job.run.model_card import render_model_card
from job.run.report import run_figures
from tests.conftest import REPO
from tests.test_model_card import _checkpoint

TOKEN = "hf_test_token_never_written_1234"


@pytest.fixture
def export(tmp_path) -> Path:
    output = tmp_path / "out"
    card = render_model_card(RunConfig.load(), run_figures([], {}))
    return checkpoints.export_final(_checkpoint(output), output, texts={run_files.MODEL_CARD: card})


@pytest.fixture
def online(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.mirror.internal:8080")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # huggingface_hub read the session's 1 at import


@pytest.fixture
def hub(monkeypatch):
    """HfApi's two network calls, recorded (no network here): the rest of huggingface_hub runs as it is."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", self.endpoint, self.token, repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", self.endpoint, self.token, kwargs["repo_id"], kwargs))
        return SimpleNamespace(commit_url=f"{self.endpoint}/{kwargs['repo_id']}/commit/abc123")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def _push(*args: str):
    return CliRunner().invoke(cli, ["push", *args])


def _one_line_refusal(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr


def test_the_export_is_uploaded_to_the_endpoint_with_the_env_token(export, online, hub, tmp_path):
    result = _push("--model", str(export), "--repo", "team/bloom-zh-news")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "http://hub.mirror.internal:8080/team/bloom-zh-news/commit/abc123"
    (create, _, _, _, create_args), (upload, endpoint, token, repo, upload_args) = hub
    assert (create, upload) == ("create_repo", "upload_folder")
    assert create_args["private"] is True and create_args["exist_ok"] is True  # private unless --public
    assert (endpoint, token, repo) == ("http://hub.mirror.internal:8080", TOKEN, "team/bloom-zh-news")
    assert Path(upload_args["folder_path"]) == export and (export / "README.md").is_file()
    assert "verified export" in upload_args["commit_message"]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert written == []  # not in the export, not in HF_HOME (no login, no stored token)


def test_push_refuses_offline_mode_first(export, online, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_refusal(_push("--model", "/nowhere", "--repo", "team/x"), "HF_HUB_OFFLINE=1")
    assert hub == []


def _flip_bytes(path: Path, count: int = 1000) -> None:
    """Invert `count` bytes of the tensor data at the end of the file: its size and header stay as they were."""
    data = bytearray(path.read_bytes())
    data[-count:] = bytes(b ^ 0xFF for b in data[-count:])
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda mp, export: mp.delenv("HF_TOKEN"), "HF_TOKEN is not set"),
        (lambda mp, export: (export / "README.md").unlink(), "has no model card"),
        (lambda mp, export: (export / "model.safetensors").write_bytes(b"\x00\x01"), "no valid header"),
        (lambda mp, export: (export / "config.json").unlink(), "no config.json"),
        (lambda mp, export: _flip_bytes(export / "model.safetensors"), "model.safetensors changed since"),
        (lambda mp, export: (export / "extra.bin").write_bytes(b"x"), "files differ from those verified (extra.bin)"),
        (lambda mp, export: (export / "SHA256SUMS").unlink(), "has no readable SHA256SUMS"),
    ],
)
def test_push_refuses_what_it_cannot_verify(export, online, hub, monkeypatch, change, words):
    change(monkeypatch, export)
    _one_line_refusal(_push("--model", str(export), "--repo", "team/x"), words)
    assert hub == []


def test_a_bad_repo_id_is_refused(export, online, hub):
    _one_line_refusal(_push("--model", str(export), "--repo", "not a repo//id"), "is not a hub repository id")
    assert hub == []


def test_a_refusal_by_the_hub_is_one_line(export, online, hub, monkeypatch):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    def unauthorized(self, **kwargs):
        request = httpx2.Request("POST", f"{self.endpoint}/api/models/team/x/commit/main")
        response = httpx2.Response(401, request=request)
        raise HfHubHTTPError("401 Client Error: Unauthorized for url", response=response)

    monkeypatch.setattr(HfApi, "upload_folder", unauthorized)
    _one_line_refusal(_push("--model", str(export), "--repo", "team/x"), "refused the upload to team/x: 401")


@pytest.fixture
def silent_listener():
    """A real listener on loopback that accepts every connection and never answers; yields (port, accepted)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept():
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                accepted.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()
    for conn in accepted:
        conn.close()


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]  # closed again on leaving: nothing listens there


def test_an_endpoint_that_never_answers_is_one_line_within_the_timeout(export, online, monkeypatch, silent_listener):
    port, accepted = silent_listener
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("JOB_HUB_TIMEOUT", "1")
    started = time.monotonic()
    result = _push("--model", str(export), "--repo", "team/x")
    _one_line_refusal(result, f"http://127.0.0.1:{port} cannot be reached: ReadTimeout")
    assert accepted and time.monotonic() - started < 60  # without a timeout it waits forever


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:{closed}", "http://no-such-host.invalid"])
def test_an_endpoint_that_refuses_or_does_not_resolve_is_one_line(export, online, monkeypatch, endpoint):
    monkeypatch.setenv("HF_ENDPOINT", endpoint.format(closed=_closed_port()))
    _one_line_refusal(_push("--model", str(export), "--repo", "team/x"), "cannot be reached: ConnectError")


def test_a_tls_failure_is_one_line(export, online, monkeypatch):
    server = socket.create_server(("127.0.0.1", 0))  # answers a TLS hello with plain text

    def answer_in_plain_text():
        with contextlib.suppress(OSError), server:
            while True:
                conn = server.accept()[0]
                with conn:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer_in_plain_text, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{server.getsockname()[1]}")
    result = _push("--model", str(export), "--repo", "team/x")
    server.close()
    _one_line_refusal(result, "cannot be reached: ConnectError")
    assert "SSL" in result.stderr


@pytest.mark.parametrize("value", ["0", "abc", "nan", "-5"])
def test_a_bad_timeout_is_refused_before_anything_is_read(online, monkeypatch, value):
    monkeypatch.setenv("JOB_HUB_TIMEOUT", value)
    _one_line_refusal(_push("--model", "/nowhere", "--repo", "team/x"), f"JOB_HUB_TIMEOUT={value!r}")


def test_a_push_waiting_on_the_hub_ends_on_sigterm(export, online, silent_listener, tmp_path):
    port, accepted = silent_listener
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "JOB_HUB_TIMEOUT": "600"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", "push", "--model", str(export), "--repo", "team/x"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while not accepted and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert accepted, "push never reached the listener"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 75, err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM"), err
