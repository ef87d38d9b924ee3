"""job.run.push: a verified export with its model card goes to the hub through huggingface_hub; every refusal is
one line, exit 2, and the token is never written anywhere."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi

from job.cli import cli
from job.core import checkpoints, run_files
from job.core.config import RunConfig
from job.run.model_card import render_model_card
from job.run.report import run_figures
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


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda mp, export: mp.delenv("HF_TOKEN"), "HF_TOKEN is not set"),
        (lambda mp, export: (export / "README.md").unlink(), "has no model card"),
        (lambda mp, export: (export / "model.safetensors").write_bytes(b"\x00\x01"), "no valid header"),
        (lambda mp, export: (export / "config.json").unlink(), "no config.json"),
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
