"""Private Trainer and DataLoader internals (job/run/private_apis.py): each declares the releases it was written
for, and any other release, or one that dropped the attribute, is refused in one line before anything runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from job.core.errors import EXIT_BAD_INPUT, JobError
from job.run import private_apis
from job.run.private_apis import PRIVATE_APIS, PrivateApi, private_api_problem, require_private_apis
from tests.conftest import REPO


def test_every_private_api_the_worker_uses_is_declared_and_holds_here():
    import inspect

    from job.run import op_builds, worker

    source = inspect.getsource(worker) + inspect.getsource(op_builds)
    for api in PRIVATE_APIS:
        assert api.attribute in source and private_api_problem(api) is None, api
    assert {"_prepare_inputs", "_track_num_input_tokens"} <= {
        name for name in vars(worker.JobTrainer) if name.startswith("_") and not name.startswith("__")
    }
    checked = require_private_apis()
    assert "transformers 5.24" in checked and "torch 2.13" in checked and "deepspeed 0.19" in checked


def test_another_release_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(private_apis, "_installed", lambda package: Version("5.25.0"))
    with pytest.raises(JobError) as refused:
        require_private_apis()
    assert "Trainer._prepare_inputs was written for transformers" in refused.value.cause
    assert "this is 5.25.0" in refused.value.cause and "<5.25" in refused.value.fix


def test_a_release_without_the_attribute_is_refused():
    gone = PrivateApi("transformers", "transformers:Trainer", "_no_such_method", SpecifierSet(">=0"), "a test")
    with pytest.raises(JobError, match=r"has no transformers\.Trainer\._no_such_method"):
        require_private_apis((gone,))


def test_train_refuses_such_a_release_before_anything_is_written(tmp_path):
    """The real CLI, with the installed transformers reported as a release the overrides were not written for."""
    output = tmp_path / "run"
    script = (
        "import sys; from packaging.version import Version; from job.run import private_apis; "
        "private_apis._installed = lambda package: Version('9.0.0'); "
        "from job.cli import main; sys.argv = ['job', 'train', '--output-dir', sys.argv[1]]; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(output)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "written for transformers" in lines[0] and "this is 9.0.0" in lines[0], proc.stderr
    assert not output.exists()
