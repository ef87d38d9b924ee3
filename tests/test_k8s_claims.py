"""tools/k8s_claims.py: a multi-node target refuses, before applying anything, claims one node only can mount."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO
from tools import k8s_claims


def _claim(name: str, *modes: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": list(modes)},
    }


def test_the_shipped_claims_are_refused_for_several_nodes_only(capsys):
    path = str(REPO / "k8s" / "pvcs.yaml")
    assert k8s_claims.main(["--nodes", "1", path]) == 0
    assert k8s_claims.main(["--nodes", "2", path]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: 2 pods at once, on up to 2 nodes, need ReadWriteMany claims") and " -- " in line
    assert "bloom-zh-output (ReadWriteOnce)" in line and "K8S_ACCESS_MODE=ReadWriteMany" in line


def test_existing_claims_from_kubectl_count_too(monkeypatch, tmp_path, capsys):
    rendered = tmp_path / "pvcs.yaml"
    rendered.write_text("---\n" + json.dumps(_claim("bloom-zh-output", "ReadWriteMany")) + "\n")
    existing = {"apiVersion": "v1", "kind": "List", "items": [_claim("bloom-zh-output", "ReadWriteOnce")]}
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(existing)))
    assert k8s_claims.main(["--nodes", "4", str(rendered), "-"]) == 2  # the claim that exists keeps its mode
    assert "bloom-zh-output (ReadWriteOnce)" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"kind": "List", "items": []})))
    assert k8s_claims.main(["--nodes", "4", str(rendered), "-"]) == 0  # none yet: the RWX ones will be created


@pytest.mark.parametrize(
    "modes, ok",
    [
        (("ReadWriteMany",), True),
        (("ReadWriteOnce", "ReadWriteMany"), True),
        (("ReadWriteOncePod",), False),
        ((), False),
    ],
)
def test_only_read_write_many_suits_several_nodes(modes, ok):
    assert (k8s_claims.check({"c": list(modes)}, nodes=2) is None) is ok
    assert k8s_claims.check({"c": list(modes)}, nodes=1) is None


# A stand-in kubectl for `make k8s-prepare`: `kustomize` is the real one's; `get pvc` answers with the claims in
# FAKE_CLAIMS (a kubectl List); `apply -f FILE` keeps a copy of FILE; `get job` reports the Job complete.
FAKE_KUBECTL = """\
#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[0] == "kustomize":
    sys.exit(subprocess.run([os.environ["REAL_KUBECTL"], *args]).returncode)
if args[:2] == ["get", "pvc"]:
    print(open(os.environ["FAKE_CLAIMS"]).read())
elif args[:2] == ["get", "job"]:
    print("Complete")
elif args[0] == "apply":
    path = args[args.index("-f") + 1]
    shutil.copy(path, os.path.join(os.environ["FAKE_APPLIED"], os.path.basename(path)))
elif args[0] == "wait":
    sys.exit(int(os.environ.get("FAKE_WAIT_RC", "0")))
elif args[0] == "logs":
    print("/data: owner 1000:1000, mode 775")
"""


def _make_target(tmp_path, access_mode: str, existing_mode: str | None, target="k8s-prepare", **extra_env):
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    claims = tmp_path / "claims.json"
    existing = [_claim("bloom-zh-data", existing_mode)] if existing_mode else []
    claims.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": existing}))
    applied = tmp_path / "applied"
    applied.mkdir()
    env = {
        **os.environ,
        "FAKE_LOG": str(tmp_path / "calls"),
        "FAKE_CLAIMS": str(claims),
        "FAKE_APPLIED": str(applied),
        "REAL_KUBECTL": str(REPO / ".venv" / "bin" / "kubectl"),
        **extra_env,
    }
    done = subprocess.run(
        [
            "make",
            "-s",
            target,
            f"KUBECTL={kubectl}",
            f"K8S_BUILD={tmp_path / 'build'}",
            f"K8S_ACCESS_MODE={access_mode}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    return done, [c for c in calls if c[0] == "apply"], applied


def _parallelism(applied) -> tuple[int, int]:
    (job,) = [d for d in yaml.safe_load_all((applied / "prepare.yaml").read_text()) if d and d["kind"] == "Job"]
    return job["spec"]["parallelism"], job["spec"]["completions"]


def test_make_prepare_runs_one_pod_at_a_time_on_read_write_once_claims(tmp_path):
    done, applies, applied = _make_target(tmp_path, "ReadWriteOnce", None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [a[-1].rsplit("/", 1)[-1] for a in applies] == ["pvcs.yaml", "prepare.yaml"]
    parallelism, completions = _parallelism(applied)
    assert parallelism == 1 and completions == 4
    assert k8s_claims.claims((applied / "pvcs.yaml").read_text())["bloom-zh-data"] == ["ReadWriteOnce"]


def test_make_prepare_runs_every_pod_at_once_on_read_write_many_claims(tmp_path):
    done, _, applied = _make_target(tmp_path, "ReadWriteMany", "ReadWriteMany")
    assert done.returncode == 0, done.stdout + done.stderr
    parallelism, completions = _parallelism(applied)
    assert parallelism == completions == 4


def test_make_prepare_refuses_parallel_pods_on_an_existing_read_write_once_claim(tmp_path):
    """K8S_ACCESS_MODE=ReadWriteMany, but the data claim exists as ReadWriteOnce (its mode cannot change): refused in
    one line before anything is applied."""
    done, applies, _ = _make_target(tmp_path, "ReadWriteMany", "ReadWriteOnce")
    assert done.returncode != 0 and applies == []
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert "bloom-zh-data (ReadWriteOnce)" in line and "K8S_PREPARE_PARALLELISM=1" in line


@pytest.mark.parametrize("wait_rc", [0, 1])
def test_make_volume_permissions_applies_the_job_with_make_image_and_shows_its_log(tmp_path, wait_rc):
    done, applies, applied = _make_target(
        tmp_path, "ReadWriteMany", None, target="k8s-volume-permissions", FAKE_WAIT_RC=str(wait_rc)
    )
    assert (done.returncode == 0) == (wait_rc == 0), done.stdout + done.stderr
    assert [a[-1].rsplit("/", 1)[-1] for a in applies] == ["volume-permissions.yaml"]
    (job,) = [d for d in yaml.safe_load_all((applied / "volume-permissions.yaml").read_text()) if d]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == (REPO / "k8s" / "job.yaml").read_text().split("image: ")[1].split()[0]
    assert "owner 1000:1000" in done.stdout  # the Job's log, whether it completed or not
