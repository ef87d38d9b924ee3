"""job.run.push: a verified export with its model card goes to the hub through huggingface_hub; every refusal is
one line, exit 2, and the token is never written anywhere."""

from __future__ import annotations

import contextlib
import hashlib
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
from huggingface_hub.errors import RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash

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


class StandInHub:
    """The hub's side of the four HfApi calls push makes (create_repo, create_branch, list_repo_tree,
    create_commit), kept in memory: no hub server can run here (none is published to run locally).
    huggingface_hub's own code up to those calls runs as it is (CommitOperationAdd hashes each file)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.branches: dict[tuple[str, str], dict[str, bytes]] = {}
        self.fail_commits: list[Exception] = []  # raised by the next create_commit calls, in order

    def install(self, monkeypatch) -> StandInHub:
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", api.endpoint, api.token, repo_id, kwargs))
            hub.branches.setdefault((repo_id, "main"), {})
            return SimpleNamespace(repo_id=repo_id)

        def create_branch(api, repo_id, *, branch, **kwargs):
            hub.calls.append(("create_branch", api.endpoint, api.token, repo_id, {"branch": branch, **kwargs}))
            hub.branches.setdefault((repo_id, branch), dict(hub.branches[repo_id, "main"]))

        def list_repo_tree(api, repo_id, *, revision=None, recursive=False, **kwargs):
            files = hub.branches.get((repo_id, revision or "main"))
            if files is None:
                raise RevisionNotFoundError(f"{revision} not found", response=_response(api, 404))
            for path, data in files.items():
                lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                yield RepoFile(path=path, size=len(data), oid=git_hash(data), lfs=lfs if _is_lfs(path) else None)

        def create_commit(api, repo_id, operations, *, commit_message, revision=None, **kwargs):
            hub.calls.append(("create_commit", api.endpoint, api.token, repo_id, {"revision": revision}))
            if hub.fail_commits:
                raise hub.fail_commits.pop(0)
            files = hub.branches[repo_id, revision or "main"]
            for op in operations:
                with op.as_file() as f:
                    files[op.path_in_repo] = f.read()
            hub.calls[-1][-1].update(message=commit_message, paths=[op.path_in_repo for op in operations])
            return SimpleNamespace(commit_url=f"{api.endpoint}/{repo_id}/commit/c{len(hub.calls)}")

        for name, fn in [
            ("create_repo", create_repo),
            ("create_branch", create_branch),
            ("list_repo_tree", list_repo_tree),
            ("create_commit", create_commit),
        ]:
            monkeypatch.setattr(HfApi, name, fn)
        return self

    def commits(self) -> list[dict]:
        return [kwargs for name, *_, kwargs in self.calls if name == "create_commit" and "paths" in kwargs]


def _is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


def _response(api, status: int):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("POST", f"{api.endpoint}/api/models/x/commit/main"))


@pytest.fixture
def stand_in(monkeypatch) -> StandInHub:
    return StandInHub().install(monkeypatch)


@pytest.fixture
def hub(stand_in):
    return stand_in.calls


def _push(*args: str):
    return CliRunner().invoke(cli, ["push", *args])


def _one_line_refusal(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr


def test_the_export_is_uploaded_to_the_endpoint_with_the_env_token(export, online, stand_in, tmp_path):
    result = _push("--model", str(export), "--repo", "team/bloom-zh-news")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "http://hub.mirror.internal:8080/team/bloom-zh-news/commit/c2"
    (create, _, _, _, create_args), (commit, endpoint, token, repo, commit_args) = stand_in.calls
    assert (create, commit) == ("create_repo", "create_commit")
    assert create_args["private"] is True and create_args["exist_ok"] is True  # private unless --public
    assert (endpoint, token, repo) == ("http://hub.mirror.internal:8080", TOKEN, "team/bloom-zh-news")
    assert "verified export" in commit_args["message"]
    files = stand_in.branches["team/bloom-zh-news", "main"]
    assert set(files) == {p.name for p in export.iterdir()}  # small files: one commit
    assert files["model.safetensors"] == (export / "model.safetensors").read_bytes()
    assert b'from_pretrained("team/bloom-zh-news")' in files["README.md"]  # the repository in the usage snippet
    written = [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert written == []  # not in the export, not in HF_HOME (no login, no stored token)


def test_a_clone_of_the_pushed_repository_passes_its_own_checksums(export, online, stand_in, tmp_path):
    """The card gets the repository's id at push time: the SHA256SUMS the hub gets lists those bytes. Only what the
    export's checksums recorded is sent (not a folder someone put beside it)."""
    (export / "notes").mkdir()
    (export / "notes" / "draft.txt").write_text("not part of the export\n")
    assert _push("--model", str(export), "--repo", "team/bloom-zh-news").exit_code == 0
    clone = tmp_path / "clone"
    clone.mkdir()
    for name, content in stand_in.branches["team/bloom-zh-news", "main"].items():
        (clone / name).write_bytes(content)
    assert b"team/bloom-zh-news" in (clone / run_files.MODEL_CARD).read_bytes()
    checked = subprocess.run(
        ["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=clone, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    listed = {line.split("  ", 1)[1] for line in (clone / "SHA256SUMS").read_text().splitlines()}
    assert listed | {"SHA256SUMS"} == {p.name for p in clone.iterdir()}  # every file, and nothing from notes/


@pytest.mark.parametrize(("setting", "xet_used"), [(None, False), ("0", True)])
def test_files_go_through_the_bounded_client_unless_xet_is_asked_for(
    export, online, stand_in, monkeypatch, setting, xet_used
):
    from huggingface_hub.utils._runtime import is_xet_available

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # as imported where the variable is not set
    if setting is None:
        monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_DISABLE_XET", setting)
    assert is_xet_available()  # hf_xet is installed: without the job, uploads would take it
    assert _push("--model", str(export), "--repo", "team/bloom-zh-news").exit_code == 0
    assert is_xet_available() is xet_used


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

    def unauthorized(self, *args, **kwargs):
        request = httpx2.Request("POST", f"{self.endpoint}/api/models/team/x/commit/main")
        response = httpx2.Response(401, request=request)
        raise HfHubHTTPError("401 Client Error: Unauthorized for url", response=response)

    monkeypatch.setattr(HfApi, "create_commit", unauthorized)
    _one_line_refusal(_push("--model", str(export), "--repo", "team/x"), "refused the upload to team/x: 401")


# ------------------------------------------------------------------------------- big exports: resumable
@pytest.fixture
def sharded_export(tmp_path, monkeypatch) -> Path:
    """An export whose weights are safetensors shards, each above the size that gets a commit of its own."""
    from job.run import push
    from tests.conftest import tiny_bloom

    output = tmp_path / "big"
    checkpoint = output / "checkpoint-20"
    tiny_bloom(64).save_pretrained(checkpoint, max_shard_size="40KB")
    (checkpoint / "trainer_state.json").write_text('{"global_step": 20, "max_steps": 20}')
    card = render_model_card(RunConfig.load(), run_figures([], {}))
    final = checkpoints.export_final(checkpoint, output, texts={run_files.MODEL_CARD: card})
    shards = sorted(p.name for p in final.glob("*.safetensors"))
    assert len(shards) >= 3, shards
    monkeypatch.setattr(push, "SMALL_FILE_BYTES", min((final / s).stat().st_size for s in shards) - 1)
    monkeypatch.setattr(push, "RETRY_WAIT_S", 0.01)
    return final


def test_each_shard_is_a_commit_of_its_own_and_the_small_files_come_last(sharded_export, online, stand_in):
    result = _push("--model", str(sharded_export), "--repo", "team/big")
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in sharded_export.glob("*.safetensors"))
    commits = stand_in.commits()
    assert [c["paths"] for c in commits[:-1]] == [[s] for s in shards]
    assert "model.safetensors.index.json" in commits[-1]["paths"] and "README.md" in commits[-1]["paths"]
    rewritten = {"README.md", "SHA256SUMS"}  # for the repository: its id in the card, and the card's checksum
    assert {p.name: p.read_bytes() for p in sharded_export.iterdir() if p.name not in rewritten}.items() <= (
        stand_in.branches["team/big", "main"].items()
    )


def test_an_interrupted_push_run_again_sends_only_what_is_missing(sharded_export, online, stand_in):
    import httpx2

    shards = sorted(p.name for p in sharded_export.glob("*.safetensors"))
    # the connection drops during the second shard's commit, every attempt of it
    real = HfApi.create_commit
    sent = []

    def dropping(api, repo_id, operations, **kwargs):
        if len(sent) == 1:
            stand_in.calls.append(("create_commit", api.endpoint, api.token, repo_id, {}))
            raise httpx2.ConnectError("connection reset by peer")
        sent.append(operations[0].path_in_repo)
        return real(api, repo_id, operations, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HfApi, "create_commit", dropping)
        failed = _push("--model", str(sharded_export), "--repo", "team/big")
    assert failed.exit_code == 2 and "Traceback" not in failed.output, failed.output
    last = failed.stderr.strip().splitlines()[-1]  # after a line per attempt
    assert last.startswith("error: ") and f"{shards[1]} to team/big failed 4 times" in last and "push again" in last
    assert set(stand_in.branches["team/big", "main"]) == {shards[0]}
    before = len(stand_in.commits())
    result = _push("--model", str(sharded_export), "--repo", "team/big")  # run again
    assert result.exit_code == 0, result.output
    again = [p for c in stand_in.commits()[before:] for p in c["paths"]]
    assert shards[0] not in again and set(shards[1:]) <= set(again)  # the first shard is not sent again
    assert set(stand_in.branches["team/big", "main"]) == {p.name for p in sharded_export.iterdir()}
    before = len(stand_in.commits())
    third = _push("--model", str(sharded_export), "--repo", "team/big")  # everything there: nothing sent
    assert third.exit_code == 0 and third.stdout.strip().endswith("/team/big/tree/main"), third.output
    assert len(stand_in.commits()) == before


def test_a_transient_failure_is_retried_and_a_refusal_is_not(sharded_export, online, stand_in):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint="http://hub.mirror.internal:8080")
    stand_in.fail_commits = [
        httpx2.ReadTimeout("timed out"),
        HfHubHTTPError("503 Service Unavailable", response=_response(api, 503)),
    ]
    assert _push("--model", str(sharded_export), "--repo", "team/big").exit_code == 0
    assert set(stand_in.branches["team/big", "main"]) == {p.name for p in sharded_export.iterdir()}
    stand_in.fail_commits = [HfHubHTTPError("403 Forbidden", response=_response(api, 403))]
    _reexport_with_other_config(sharded_export)
    tries = len(stand_in.calls)
    _one_line_refusal(
        _push("--model", str(sharded_export), "--repo", "team/big"), "refused the upload to team/big: 403"
    )
    assert [c[0] for c in stand_in.calls[tries:]] == ["create_repo", "create_commit"]  # not tried again


def _reexport_with_other_config(export: Path) -> None:
    """The export as a later run re-exports it: config.json differs, and its hashes are recorded again."""
    (export / "config.json").write_text((export / "config.json").read_text() + " ")
    checkpoints.record_hashes(export)


def test_revision_pushes_to_a_branch_made_from_main(sharded_export, online, stand_in):
    assert _push("--model", str(sharded_export), "--repo", "team/big").exit_code == 0
    main = dict(stand_in.branches["team/big", "main"])
    _reexport_with_other_config(sharded_export)
    result = _push("--model", str(sharded_export), "--repo", "team/big", "--revision", "v2")
    assert result.exit_code == 0, result.output
    assert stand_in.branches["team/big", "main"] == main  # main untouched
    branch = stand_in.branches["team/big", "v2"]
    assert branch["config.json"] == (sharded_export / "config.json").read_bytes()
    (last,) = stand_in.commits()[-1:]
    assert last["revision"] == "v2" and last["paths"] == ["SHA256SUMS", "config.json"]  # the rest: from main


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
