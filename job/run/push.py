"""`python -m job push`: upload a verified export (`OUTPUT/final`, with its model card) to a model hub, through
huggingface_hub.

Only an export is pushed, never a training run's checkpoints (`--training-arg push_to_hub` is refused in
`job.run.training_args`). The hub is $HF_ENDPOINT (default huggingface.co; a mirror or a private hub); the token is
$HF_TOKEN, read from the environment only and never written anywhere. With HF_HUB_OFFLINE set (the image's default)
the push is refused in one line, before anything is read.

Every request has a timeout ($JOB_HUB_TIMEOUT seconds to connect and between bytes, default 60): huggingface_hub's
own client waits forever on an endpoint that accepts and never answers. An endpoint that cannot be reached (refused,
unknown host, TLS failure, a stall) is one line, exit 2.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from job.core import run_files
from job.core.checkpoints import changed_files, verify_export
from job.core.errors import JobError
from job.core.logs import adopt_library_loggers
from job.core.weights import check_weights

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


def bound_requests(seconds: float) -> None:
    """Give huggingface_hub's shared HTTP client a timeout (its default client has none)."""
    import httpx2
    from huggingface_hub.utils import _http

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


def push(model: str | Path, repo_id: str, private: bool = True, commit_message: str | None = None) -> str:
    """Upload the export at `model` to `repo_id` (created if missing, private unless asked); the commit's URL."""
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
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            commit_message=commit_message or f"Upload {folder.name}: {parameters:,} parameters, verified export",
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
    return commit.commit_url
