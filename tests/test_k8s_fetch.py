"""tools/k8s_fetch.py against a stand-in kubectl that runs the pod's shell command here on a folder laid out like
the output claim: what comes back, what stays, the pod spec, and that the pod is deleted whatever happens."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tools import k8s_fetch

FAKE_KUBECTL = """\
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
verb = next(a for a in args if a in ("apply", "wait", "exec", "delete"))
if verb == "apply":
    open(os.environ["FAKE_MANIFEST"], "w").write(sys.stdin.read())
elif verb == "wait":
    sys.exit(int(os.environ.get("FAKE_WAIT_RC", "0")))
elif verb == "exec":
    command = args[args.index("--") + 1 :]
    command = [a.replace("/output", os.environ["FAKE_CLAIM"], 1) if a.startswith("/output") else a for a in command]
    sys.exit(subprocess.run(command).returncode)  # the pod's sh and tar, run here
"""


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    claim = tmp_path / "claim"
    run = claim / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "model.safetensors").write_bytes(b"weights")
    (run / "final" / "README.md").write_text("---\nlanguage: zh\n---\n")
    (run / "checkpoint-20").mkdir()
    (run / "checkpoint-20" / "optimizer.pt").write_bytes(b"big")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out").write_bytes(b"tb")
    for name in ("report.md", "loss.png", "metrics.jsonl", "exit_status.json", "run_config.json"):
        (run / name).write_text(name)
    kubectl = tmp_path / "kubectl.py"
    kubectl.write_text(FAKE_KUBECTL)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_MANIFEST", str(tmp_path / "manifest.json"))
    monkeypatch.setenv("FAKE_CLAIM", str(claim))
    return tmp_path, f"{sys.executable} {kubectl}"


def _calls(root: Path) -> list[list[str]]:
    return [json.loads(line) for line in (root / "calls.jsonl").read_text().splitlines()]


def test_results_come_back_checkpoints_stay_and_the_pod_goes(cluster, capsys):
    root, kubectl = cluster
    dest = root / "here"
    args = ["--image", "registry.example/fetch-test:1.2.0", "--kubectl", kubectl, "--dest", str(dest)]
    assert k8s_fetch.main([*args, "--namespace", "team-a"]) == 0
    assert (dest / "final" / "model.safetensors").read_bytes() == b"weights"
    assert (
        (dest / "report.md").is_file()
        and (dest / "metrics.jsonl").is_file()
        and (dest / "final" / "README.md").is_file()
    )
    assert not (dest / "checkpoint-20").exists() and not (dest / "tensorboard").exists()
    assert capsys.readouterr().out.startswith("fetched exit_status.json, final, loss.png, metrics.jsonl")
    calls = _calls(root)
    assert all(c[:2] == ["--namespace", "team-a"] for c in calls)
    assert [c[2] for c in calls] == ["apply", "wait", "exec", "delete"]
    pod = json.loads((root / "manifest.json").read_text())
    assert calls[-1][4] == pod["metadata"]["name"]  # the pod it made is the pod it deleted
    assert pod["spec"]["volumes"] == [
        {"name": "output", "persistentVolumeClaim": {"claimName": "bloom-zh-output", "readOnly": True}}
    ]
    assert pod["spec"]["containers"][0]["volumeMounts"][0]["readOnly"] is True
    assert pod["spec"]["activeDeadlineSeconds"] == k8s_fetch.LIFETIME_S  # never lingers
    assert k8s_fetch.main([*args, "--tensorboard"]) == 0
    assert (dest / "tensorboard" / "events.out").is_file()


def test_a_failure_is_one_line_and_the_pod_is_still_deleted(cluster, monkeypatch, capsys):
    root, kubectl = cluster
    monkeypatch.setenv("FAKE_WAIT_RC", "1")
    assert k8s_fetch.main(["--image", "img:1", "--kubectl", kubectl, "--dest", str(root / "here")]) == 1
    assert [c[0] for c in _calls(root)] == ["apply", "wait", "delete"]
    assert capsys.readouterr().err.strip().startswith("error: fetching /output/run from claim bloom-zh-output failed")
    monkeypatch.delenv("FAKE_WAIT_RC")
    os.remove(root / "calls.jsonl")
    assert k8s_fetch.main(["--image", "img:1", "--kubectl", kubectl, "--run", "nope", "--dest", str(root / "x")]) == 1
    assert "no results there" in capsys.readouterr().err and _calls(root)[-1][0] == "delete"


def test_the_pod_spec_is_valid_for_kubernetes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    manifest = k8s_fetch.pod_manifest("bloom-zh-fetch-1", "bloom-zh-output", "registry.example/fetch-test:1.2.0")
    kubernetes_validate.validate(manifest, "1.31.0", strict=True)
