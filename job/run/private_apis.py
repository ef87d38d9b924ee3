"""The private Trainer and torch internals the worker relies on, each with the releases it was written for.

A private method can change its meaning in any release without notice. Like the model patches (`written_for` in
`job.model.patches`), every override or call of one here names the package releases whose code it was read
against; `require_private_apis` refuses any other installed release in one line (before any process starts: a
preflight check, and again where the Trainer is built), and names the attribute that is missing when a release
dropped it. To move to a new release: read the named code in it, then widen the range.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from job.core.errors import JobError


@dataclass(frozen=True)
class PrivateApi:
    package: str  # the distribution whose release is checked
    owner: str  # the importable object holding it: "module:Class", or "module" for a module's own function
    attribute: str
    written_for: SpecifierSet
    use: str  # what the job does with it


TRAINER_INTERNALS = SpecifierSet(">=5.24,<5.25")  # transformers' Trainer as read for JobTrainer
DATALOADER_INTERNALS = SpecifierSet(">=2.13,<2.14")  # torch's multiprocessing DataLoader iterator
EXTENSION_BUILD_INTERNALS = SpecifierSet(">=2.13,<2.14")  # torch's cpp_extension build folder and its lock file
OP_BUILDER_INTERNALS = SpecifierSet(">=0.19.8,<0.20")  # DeepSpeed's OpBuilder.jit_load

PRIVATE_APIS = (
    PrivateApi(
        "transformers",
        "transformers:Trainer",
        "_prepare_inputs",
        TRAINER_INTERNALS,
        "JobTrainer takes the host token count out of every batch before the model sees it",
    ),
    PrivateApi(
        "transformers",
        "transformers:Trainer",
        "_track_num_input_tokens",
        TRAINER_INTERNALS,
        "JobTrainer counts real tokens on the host instead of a GPU gather per micro-step",
    ),
    PrivateApi(
        "torch",
        "torch.utils.data.dataloader:_MultiProcessingDataLoaderIter",
        "_shutdown_workers",
        DATALOADER_INTERNALS,
        "stop_dataloader_workers asks a DataLoader's workers to stop (DataLoader._iterator holds the iterator)",
    ),
    PrivateApi(
        "torch",
        "torch.utils.cpp_extension",
        "_get_build_directory",
        EXTENSION_BUILD_INTERNALS,
        "job.run.op_builds finds the folder where torch holds its build lock (`lock`, polled without a timeout)",
    ),
    PrivateApi(
        "deepspeed",
        "deepspeed.ops.op_builder.builder:OpBuilder",
        "jit_load",
        OP_BUILDER_INTERNALS,
        "job.run.op_builds wraps every JIT op build in a lock that a killed builder cannot leave held",
    ),
)


def _installed(package: str) -> Version:
    return Version(Version(version(package)).base_version)  # 2.13.0+cu128 -> 2.13.0: a build is its release


def private_api_problem(api: PrivateApi, installed: Version | None = None) -> str | None:
    """Why `api` cannot be relied on here (None: it can)."""
    installed = installed or _installed(api.package)
    named = f"{api.owner.replace(':', '.')}.{api.attribute}"
    if installed not in api.written_for:
        return f"{named} was written for {api.package} {api.written_for}, this is {installed}"
    module, _, name = api.owner.partition(":")
    owner = importlib.import_module(module)
    if not hasattr(getattr(owner, name) if name else owner, api.attribute):
        return f"{api.package} {installed} has no {named}"
    return None


def require_private_apis(apis: tuple[PrivateApi, ...] = PRIVATE_APIS) -> str:
    """Refuse a release the private APIs were not written for; returns what was checked, in words."""
    for api in apis:
        problem = private_api_problem(api)
        if problem:
            raise JobError(
                f"{problem} ({api.use})",
                f"install {api.package} {api.written_for} (pip install -c constraints.txt -r requirements.txt)",
            )
    packages = sorted({api.package for api in apis})
    return ", ".join(f"{p} {_installed(p)}" for p in packages)
