"""`python -m job push`: upload a verified export (`OUTPUT/final`, with its model card) to a model hub, through
huggingface_hub.

Only an export is pushed, never a training run's checkpoints (`--training-arg push_to_hub` is refused in
`job.run.training_args`). The hub is $HF_ENDPOINT (default huggingface.co; a mirror or a private hub); the token is
$HF_TOKEN, read from the environment only and never written anywhere. With HF_HUB_OFFLINE set (the image's default)
the push is refused in one line, before anything is read.
"""

from __future__ import annotations

import os
from pathlib import Path

from job.core import run_files
from job.core.checkpoints import verify_export
from job.core.errors import JobError
from job.core.logs import adopt_library_loggers
from job.core.weights import check_weights


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
    try:
        return verify_export(folder)
    except (RuntimeError, OSError, ValueError) as e:
        raise JobError(f"{folder} does not reload: {str(e).splitlines()[0][:300]}", "push a verified export") from None


def push(model: str | Path, repo_id: str, private: bool = True, commit_message: str | None = None) -> str:
    """Upload the export at `model` to `repo_id` (created if missing, private unless asked); the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    check_online()
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
    return commit.commit_url
