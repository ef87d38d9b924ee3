"""tools/k8s_fetch.py against a stand-in kubectl that runs the pod's shell command here on a folder laid out like
the output claim: what comes back, what stays, the pod spec, and that the pod is deleted whatever happens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
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
    assert k8s_fetch.main(["--image", "img:1", "--kubectl", kubectl, "--dest", str(root / "here")]) == 2
    assert [c[0] for c in _calls(root)] == ["apply", "wait", "delete"]
    assert capsys.readouterr().err.strip().startswith("error: fetching /output/run from claim bloom-zh-output failed")
    monkeypatch.delenv("FAKE_WAIT_RC")
    os.remove(root / "calls.jsonl")
    assert k8s_fetch.main(["--image", "img:1", "--kubectl", kubectl, "--run", "nope", "--dest", str(root / "x")]) == 2
    assert "no results there" in capsys.readouterr().err and _calls(root)[-1][0] == "delete"


def test_the_pod_spec_is_valid_for_kubernetes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    manifest = k8s_fetch.pod_manifest("bloom-zh-fetch-1", "bloom-zh-output", "registry.example/fetch-test:1.2.0", "s")
    kubernetes_validate.validate(manifest, "1.31.0", strict=True)
    assert manifest["spec"]["imagePullSecrets"] == [{"name": "s"}]
    assert "imagePullSecrets" not in k8s_fetch.pod_manifest("p", "c", "i:1")["spec"]


def restricted_violations(pod: dict) -> list[str]:
    """What Pod Security "restricted" (Kubernetes' pod-security-standards, v1.31) refuses in a pod, field by field:
    privilege escalation allowed, capabilities not dropped (ALL) or any added but NET_BIND_SERVICE, running as root
    or not declared non-root, a seccomp profile other than RuntimeDefault/Localhost, volumes other than the
    allowed kinds, host namespaces or ports, privileged containers."""
    spec, found = pod["spec"], []
    pod_ctx = spec.get("securityContext", {})
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                       "secret"}  # fmt: skip
    for volume in spec.get("volumes", []):
        if not set(volume) - {"name"} <= allowed_volumes:
            found.append(f"volume {volume['name']}")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(key)
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        ctx = c.get("securityContext", {})
        if ctx.get("privileged"):
            found.append(f"{c['name']}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities")
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            found.append(f"{c['name']}: runAsNonRoot")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            found.append(f"{c['name']}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccompProfile")
        if any("hostPort" in p for p in c.get("ports", [])):
            found.append(f"{c['name']}: hostPort")
    return found


def test_the_pod_passes_pod_security_restricted():
    pod = k8s_fetch.pod_manifest("bloom-zh-fetch-1", "bloom-zh-output", "registry.example/fetch-test:1.2.0")
    assert restricted_violations(pod) == []
    # The checker is not blind: the pod as it was (no securityContext) fails it on every count.
    bare = json.loads(json.dumps(pod))
    del bare["spec"]["securityContext"], bare["spec"]["containers"][0]["securityContext"]
    assert restricted_violations(bare) == [
        "fetch: allowPrivilegeEscalation", "fetch: capabilities", "fetch: runAsNonRoot", "fetch: seccompProfile"
    ]  # fmt: skip


# ------------------------------------------------------------------- it ends on its own, and cleans up
# A stand-in `kubectl` on PATH for the tool run as its own process: FAKE_HANG=<verb> makes that call hang (it logs
# its pid first), FAKE_STALL=1 makes `exec` send the start of the tar stream and then nothing, FAKE_GARBAGE=1 makes
# it send random bytes and exit 0.
HANGING_KUBECTL = """\
#!{python}
import io, json, os, subprocess, sys, tarfile, time
args = sys.argv[1:]
verb = next(a for a in args if a in ("apply", "wait", "exec", "delete"))
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"verb": verb, "pid": os.getpid(), "args": args}}) + "\\n")
if verb == os.environ.get("FAKE_HANG"):
    time.sleep(3600)
if verb == "apply":
    open(os.environ["FAKE_MANIFEST"], "w").write(sys.stdin.read())
elif verb == "exec" and os.environ.get("FAKE_GARBAGE"):
    sys.stdout.buffer.write(os.urandom(4096))  # not a tar stream, and kubectl says all went well
elif verb == "exec" and os.environ.get("FAKE_STALL"):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(os.environ["FAKE_CLAIM"] + "/run/final", arcname="final")
    sys.stdout.buffer.write(buffer.getvalue()[:1536])  # one header and part of a file, then silence
    sys.stdout.buffer.flush()
    time.sleep(3600)
elif verb == "exec":
    command = args[args.index("--") + 1 :]
    command = [a.replace("/output", os.environ["FAKE_CLAIM"], 1) if a.startswith("/output") else a for a in command]
    sys.exit(subprocess.run(command).returncode)
"""


@pytest.fixture
def stand_in(cluster, monkeypatch):
    root, _ = cluster
    bin_dir = root / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(HANGING_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return root


def _start(root: Path, *extra: str) -> subprocess.Popen:
    args = ["--image", "img:1", "--dest", str(root / "here"), "--kubectl-timeout-s", "3", "--ready-timeout-s", "2"]
    return subprocess.Popen(
        [sys.executable, "-m", "tools.k8s_fetch", *args, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _log(root: Path) -> list[dict]:
    path = root / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(condition, what: str, deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"not within {deadline_s} s: {what}"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _deleted_its_pod(root: Path) -> None:
    calls = _log(root)
    pod = json.loads((root / "manifest.json").read_text())["metadata"]["name"]
    assert calls[-1]["verb"] == "delete" and pod in calls[-1]["args"], calls[-1]
    hung = [c["pid"] for c in calls if c["verb"] != "delete"]
    _wait_for(lambda: all(_gone(pid) for pid in hung), "the kubectl calls it started are gone", 10)


@pytest.mark.parametrize("verb", ["apply", "wait"])
def test_a_kubectl_that_hangs_ends_it_in_one_line(stand_in, monkeypatch, verb):
    monkeypatch.setenv("FAKE_HANG", verb)
    proc = _start(stand_in)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    (line,) = err.strip().splitlines()
    assert f"`kubectl {verb}" in line and "did not answer within" in line and " -- " in line
    if verb == "wait":  # the pod exists: it is deleted
        _deleted_its_pod(stand_in)
    else:
        assert _log(stand_in)[-1]["verb"] == "delete"


def test_a_stalled_tar_stream_ends_it_in_one_line_exit_2(stand_in, monkeypatch):
    monkeypatch.setenv("FAKE_STALL", "1")
    proc = _start(stand_in, "--stall-timeout-s", "2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    (line,) = err.strip().splitlines()
    assert "the tar stream stalled: no data for 2 s" in line
    _deleted_its_pod(stand_in)


def test_a_damaged_tar_stream_ends_it_in_one_line_exit_2(stand_in, monkeypatch):
    monkeypatch.setenv("FAKE_GARBAGE", "1")
    proc = _start(stand_in)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    (line,) = err.strip().splitlines()
    assert "the tar stream is damaged" in line
    _deleted_its_pod(stand_in)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("during", ["wait", "stream"])
def test_sigterm_and_ctrl_c_delete_the_pod(stand_in, monkeypatch, signum, during):
    """The signal while kubectl wait hangs, or while the tar stream is silent: the pod is deleted, the hung kubectl
    is gone, and the tool exits 128 + the signal with one line."""
    if during == "wait":
        monkeypatch.setenv("FAKE_HANG", "wait")
    else:
        monkeypatch.setenv("FAKE_STALL", "1")
    proc = _start(stand_in, "--ready-timeout-s", "600", "--stall-timeout-s", "600")
    verb = "wait" if during == "wait" else "exec"
    _wait_for(lambda: any(c["verb"] == verb for c in _log(stand_in)), f"kubectl {verb} started")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, out + err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"stopped by {signal.Signals(signum).name}: pod bloom-zh-fetch-") and "is deleted" in line
    _deleted_its_pod(stand_in)


def test_make_k8s_fetch_passes_the_pull_secret():
    for secret, expect in (("ghcr-pull", ["--pull-secret", "ghcr-pull"]), ("", [])):
        out = subprocess.run(
            ["make", "-n", "k8s-fetch", f"K8S_PULL_SECRET={secret}"], cwd=REPO, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        (line,) = [ln for ln in out.stdout.replace("\\\n", " ").splitlines() if "tools.k8s_fetch" in ln]
        words = line.split()
        assert words[words.index("--image") + 1] == f"{_make_var('IMAGE')}:{_make_var('TAG')}"
        assert [w for w in words if w == "--pull-secret"] == expect[:1] and all(w in words for w in expect)


def _make_var(name: str) -> str:
    out = subprocess.run(
        ["make", "-s", "--eval", f"p: ; @echo $({name})", "p"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()
