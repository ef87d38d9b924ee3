"""`python -m job push`: upload a verified export (`OUTPUT/final`, with its model card) to a model hub, through
huggingface_hub.

Only an export is pushed, never a training run's checkpoints (`--training-arg push_to_hub` is refused in
`job.run.training_args`). The hub is $HF_ENDPOINT (default huggingface.co; a mirror or a private hub); the token is
$HF_TOKEN, read from the environment only and never written anywhere. With HF_HUB_OFFLINE set (the image's default)
the push is refused in one line, before anything is read.

Every request has a timeout ($JOB_HUB_TIMEOUT seconds to connect and between bytes, default 60): huggingface_hub's
own client waits forever on an endpoint that accepts and never answers. Files go through that client, not hf_xet's
(unless HF_HUB_DISABLE_XET=0 asks for it). An endpoint that cannot be reached (refused,
unknown host, TLS failure, a stall) is one line, exit 2.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path

from job.core import checkpoints, run_files
from job.core.checkpoints import changed_files, verify_export
from job.core.errors import JobError
from job.core.logs import adopt_library_loggers
from job.core.weights import check_weights

log = logging.getLogger("job")
TIMEOUT_ENV = "JOB_HUB_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0


def hub_timeout(environ: dict[str, str] | None = None) -> float:
    """$JOB_HUB_TIMEOUT in seconds (default 60): how long one request may wait to connect or for its next bytes."""
    environ = os.environ if environ is None else environ
    text = environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise JobError(f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds", "unset it or set e.g. 60")
    return seconds


def bound_requests(seconds: float, environ: dict[str, str] | None = None) -> None:
    """Give huggingface_hub's shared HTTP client a timeout (its default client has none), and send every file
    through it: hf_xet, when installed, moves large files with a Rust client of its own that this timeout does not
    reach, so it is off unless the user turned it on (HF_HUB_DISABLE_XET=0; its transfers are then unbounded)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    environ = os.environ if environ is None else environ
    if not environ.get("HF_HUB_DISABLE_XET", "").strip():
        constants.HF_HUB_DISABLE_XET = True  # read at import: the variable alone would come too late

    def client_with_timeout():
        client = _http.default_client_factory()
        client.timeout = httpx2.Timeout(seconds)
        return client

    _http.set_client_factory(client_with_timeout)


def check_online(environ: dict[str, str] | None = None) -> None:
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    environ = os.environ if environ is None else environ
    if environ.get("HF_HUB_OFFLINE", "").strip().upper() in ENV_VARS_TRUE_VALUES:
        raise JobError(
            f"HF_HUB_OFFLINE={environ['HF_HUB_OFFLINE']}: the hub is off in this environment",
            "run push where the hub is reachable with HF_HUB_OFFLINE=0 (the image sets 1)",
        )


def hub_token(environ: dict[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    token = environ.get("HF_TOKEN", "").strip()
    if not token:
        raise JobError("HF_TOKEN is not set", "export HF_TOKEN with a write token of the hub (in Kubernetes: a Secret)")
    return token


def check_export(folder: Path) -> int:
    """An export of this job, intact: config, weights that reload with stock transformers, the model card.
    Returns the parameter count."""
    if not (folder / "config.json").is_file():
        raise JobError(f"{folder} is not an HF model folder (no config.json)", "pass an export, e.g. OUTPUT/final")
    if not (folder / run_files.MODEL_CARD).is_file():
        raise JobError(
            f"{folder} has no model card ({run_files.MODEL_CARD})",
            "push an export of this job (OUTPUT/final); a rerun of the same train command re-exports an older run",
        )
    check_weights(folder)  # a truncated or corrupt file: one line
    changed = changed_files(folder)  # bytes changed in place: headers and a reload need not notice
    if changed:
        raise JobError(f"{folder} is not the export that was verified: {changed}", "export it again (rerun train)")
    try:
        return verify_export(folder)
    except (RuntimeError, OSError, ValueError) as e:
        raise JobError(f"{folder} does not reload: {str(e).splitlines()[0][:300]}", "push a verified export") from None


def push(
    model: str | Path,
    repo_id: str,
    private: bool = True,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload the export at `model` to `repo_id` (created if missing, private unless asked), on the branch
    `revision` (created from main if missing; default main); the last commit's URL."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    check_online()
    timeout = hub_timeout()
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise JobError(f"--repo {repo_id!r} is not a hub repository id ({e})", "use OWNER/NAME") from None
    token = hub_token()
    folder = Path(model)
    if not folder.is_dir():
        raise JobError(f"model folder {folder} does not exist", "pass an export, e.g. OUTPUT/final")
    adopt_library_loggers()  # no loading bars while the export is verified
    parameters = check_export(folder)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)  # read now, not at import
    bound_requests(timeout)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        return upload_resumably(
            api,
            folder,
            repo_id,
            revision,
            commit_message or f"Upload {folder.name}: {parameters:,} parameters, verified export",
        )
    except HfHubHTTPError as e:
        raise JobError(
            f"{api.endpoint} refused the upload to {repo_id}: {str(e).splitlines()[0][:300]}",
            "check that HF_TOKEN may write to that repository (and HF_ENDPOINT, if set)",
        ) from None
    except httpx2.TransportError as e:  # refused, unknown host, TLS, a stall past the timeout
        raise JobError(
            f"{api.endpoint} cannot be reached: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
            f"check HF_ENDPOINT and the network (each request waits at most {timeout:g} s: {TIMEOUT_ENV})",
        ) from None


# ---------------------------------------------------------------------------------- resumable upload
# huggingface_hub's upload_folder sends a whole export in one commit: a dropped connection 20 GB into a 25 GB export
# starts it over. Here each large file (a safetensors shard) is its own commit, retried on a transient failure, and
# a file the branch already holds with the same content is not sent again: a push run again after an interruption
# sends only what is missing. The small files (config, tokenizer, the card) go last, in one commit, so the branch
# shows a loadable model only once every shard is there.
SMALL_FILE_BYTES = 10 * 1024**2  # the hub stores larger files in LFS
COMMIT_ATTEMPTS = 4
RETRY_WAIT_S = 2.0  # doubled after each failed attempt
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def upload_files(folder: Path, repo_id: str) -> dict[str, Path | bytes]:
    """What the repository gets: the files `SHA256SUMS` recorded (which `check_export` found unchanged), the card with
    `repo_id` filled, and a `SHA256SUMS` of exactly that, so that `sha256sum -c` passes in a clone of the repository
    (the shards are not hashed again: their recorded sums were just checked)."""
    from job.run.model_card import card_for_repo

    hashes = checkpoints.recorded_hashes(folder) or {}
    files: dict[str, Path | bytes] = {name: folder / name for name in hashes}
    card = (folder / run_files.MODEL_CARD).read_text(encoding="utf-8")
    files[run_files.MODEL_CARD] = card_for_repo(card, repo_id).encode("utf-8")
    hashes[run_files.MODEL_CARD] = hashlib.sha256(files[run_files.MODEL_CARD]).hexdigest()
    files[run_files.HASHES] = checkpoints.hashes_text(hashes).encode("utf-8")
    return dict(sorted(files.items()))


def remote_files(api, repo_id: str, revision: str | None) -> dict:
    """The branch's files by path (huggingface_hub `RepoFile`: size, git blob id, LFS sha256)."""
    from huggingface_hub.errors import RemoteEntryNotFoundError, RevisionNotFoundError

    try:
        return {f.path: f for f in api.list_repo_tree(repo_id, revision=revision, recursive=True) if hasattr(f, "size")}
    except (RevisionNotFoundError, RemoteEntryNotFoundError):  # an empty repository
        return {}


def already_there(content: Path | bytes, remote) -> bool:
    """Whether the hub's file has this content: its LFS sha256, or the git blob id of a small file."""
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    size = len(content) if isinstance(content, bytes) else content.stat().st_size
    if remote is None or remote.size != size:
        return False
    if remote.lfs is not None:
        if isinstance(content, bytes):
            return hashlib.sha256(content).hexdigest() == remote.lfs.sha256
        with content.open("rb") as f:
            return sha_fileobj(f).hex() == remote.lfs.sha256
    data = content if isinstance(content, bytes) else content.read_bytes()  # small: a regular git file
    return git_hash(data) == remote.blob_id


def commit_with_retries(api, repo_id: str, revision: str | None, operations: list, message: str):
    """One commit, tried again after a transient failure (connection, timeout, 429, 5xx)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return api.create_commit(repo_id, operations, commit_message=message, repo_type="model", revision=revision)
        except (httpx2.TransportError, HfHubHTTPError) as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            transient = isinstance(e, httpx2.TransportError) or status in TRANSIENT_STATUS
            if not transient:
                raise
            if attempt == COMMIT_ATTEMPTS:
                names = ", ".join(op.path_in_repo for op in operations)
                raise JobError(
                    f"the upload of {names} to {repo_id} failed {attempt} times: {str(e).splitlines()[0][:200]}",
                    "run the same push again: it sends only what the hub does not have yet",
                ) from None
            log.warning("upload of %s failed (%s); trying again", operations[0].path_in_repo, e)
            time.sleep(RETRY_WAIT_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def upload_resumably(api, folder: Path, repo_id: str, revision: str | None, message: str) -> str:
    """Send what the branch lacks: each large file in a commit of its own, then the small ones together. Returns
    the last commit's URL, or the branch's URL when it already held everything."""
    from huggingface_hub import CommitOperationAdd

    remote = remote_files(api, repo_id, revision)
    missing = {p: c for p, c in upload_files(folder, repo_id).items() if not already_there(c, remote.get(p))}
    size = lambda content: len(content) if isinstance(content, bytes) else content.stat().st_size
    large = [p for p, c in missing.items() if size(c) > SMALL_FILE_BYTES]
    small = [p for p in missing if p not in large]
    batches = [[p] for p in large] + ([small] if small else [])
    commit = None
    for i, paths in enumerate(batches, 1):
        operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=missing[p]) for p in paths]
        note = f" ({i}/{len(batches)}: {paths[0]})" if len(batches) > 1 and len(paths) == 1 else ""
        commit = commit_with_retries(api, repo_id, revision, operations, message + note)
        log.info("uploaded %s", ", ".join(paths))
    if commit is None:
        log.info("%s already holds this export: nothing to upload", repo_id)
        return f"{api.endpoint}/{repo_id}/tree/{revision or 'main'}"
    return commit.commit_url
