"""The deployment artefacts: docker/Dockerfile, .dockerignore, k8s/, the Makefile's image and cluster targets and
the CI workflows, checked offline so that CI fails on an invalid manifest or Dockerfile.

- hadolint on the Dockerfile, plus what hadolint cannot see (non-root last USER, pinned base, torch kept);
- kubernetes-validate --strict with its bundled schemas, for every manifest and every kustomize rendering;
- kustomize through `kubectl kustomize` where a kubectl with kustomize v5 exists, else through `kustomize()`
  below, a renderer of just the kustomize features k8s/ uses (checked against kubectl wherever both exist);
- what no schema knows: container commands parse with the project's own CLI, GPU limits = --nproc, volumes
  and claims exist, --shutdown-timeout-s < terminationGracePeriodSeconds, exit codes = job/errors.py.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from job import errors
from job.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
K8S = REPO / "k8s"
MANIFESTS = sorted(p for p in [*K8S.glob("*.yaml"), *K8S.glob("multinode/*.yaml")] if p.name != "kustomization.yaml")
KUSTOMIZATIONS = [K8S, K8S / "multinode"]
K8S_VERSIONS = ["1.31.0", "1.37.0"]  # the oldest supported (podFailurePolicy GA) and the newest bundled schema
DEFAULT_IMAGE = "ghcr.io/example/bloom-zh-job"
ENTRYPOINT = ["python", "-m", "job"]
UID = 1000


# ---------------------------------------------------------------------------------------------- helpers
def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=kw.pop("cwd", REPO), capture_output=True, text=True, timeout=300, **kw)


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} missing: run `make setup` (requirements-dev.txt)"
    return str(path)


def load_docs(text: str) -> list[dict]:
    # Through JSON: the manifests use YAML anchors, and aliased nodes must not stay one shared object.
    return [json.loads(json.dumps(d)) for d in yaml.safe_load_all(text) if d]


def validate(paths: list[Path], version: str, strict: bool = True) -> subprocess.CompletedProcess:
    flags = ["--strict"] if strict else []
    return run([tool("kubernetes-validate"), *flags, "--quiet", "-k", version, *map(str, paths)])


def kubectl() -> str | None:
    """A kubectl whose kustomize is v5 or newer (replacements, local-config), or None (also with
    JOB_TEST_NO_KUBECTL=1, to exercise the fallback renderer where kubectl exists)."""
    if os.environ.get("JOB_TEST_NO_KUBECTL") == "1":
        return None
    for candidate in (BIN / "kubectl", shutil.which("kubectl")):
        if not candidate or not Path(candidate).exists():
            continue
        out = run([str(candidate), "version", "--client", "-o", "json"])
        version = json.loads(out.stdout or "{}").get("kustomizeVersion", "") if out.returncode == 0 else ""
        match = re.match(r"v(\d+)", version)
        if match and int(match.group(1)) >= 5:
            return str(candidate)
    return None


KUBECTL = kubectl()


def render(root: Path) -> list[dict]:
    if KUBECTL:
        out = run([KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(root)])
        assert out.returncode == 0, out.stderr
        return load_docs(out.stdout)
    return kustomize(root)


# ------------------------------------------------------------------- the fallback kustomize, our subset only
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images", "configMapGenerator", "transformers"}
LOCAL_CONFIG = "config.kubernetes.io/local-config"


def kustomize(root: Path) -> list[dict]:
    """`kubectl kustomize ROOT` for the features k8s/ uses; anything else raises, so it never guesses."""
    return [r for r in _build(root) if r["metadata"].get("annotations", {}).get(LOCAL_CONFIG) != "true"]


def _build(root: Path) -> list[dict]:
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    if unknown:
        raise NotImplementedError(f"{root}: the fallback renderer does not do {sorted(unknown)}")
    resources: list[dict] = []
    for entry in k.get("resources", []):
        path = (root / entry).resolve()
        resources += _build(path) if path.is_dir() else load_docs(path.read_text())
    for gen in k.get("configMapGenerator", []):
        data = dict(item.split("=", 1) for item in gen.get("literals", []))
        if gen.get("behavior", "create") == "merge":
            (target,) = [r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == gen["name"]]
            target.setdefault("data", {}).update(data)
            continue
        options = gen.get("options", {})
        if not options.get("disableNameSuffixHash"):
            raise NotImplementedError("name-suffix hashes")
        meta = {"name": gen["name"], **({"annotations": options["annotations"]} if "annotations" in options else {})}
        resources.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for image in k.get("images", []):
        for res in resources:
            for container in _containers(res):
                name, tag = _split_image(container["image"])
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    for entry in k.get("transformers", []):
        for config in _build((root / entry).resolve()):
            if config["kind"] != "ReplacementTransformer":
                raise NotImplementedError(config["kind"])
            for replacement in config["replacements"]:
                _replace(resources, replacement)
    return resources


def _containers(res: dict) -> list[dict]:
    spec = res.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _split_image(image: str) -> tuple[str, str | None]:
    name, _, tag = image.rpartition(":")
    return (name, tag) if name and "/" not in tag else (image, None)


def _selects(res: dict, select: dict) -> bool:
    if "kind" in select and res["kind"] != select["kind"]:
        return False
    if "name" in select and res["metadata"]["name"] != select["name"]:
        return False
    if "labelSelector" in select:
        key, value = select["labelSelector"].split("=")
        return res["metadata"].get("labels", {}).get(key) == value
    return True


def _path(field_path: str) -> list[str]:
    return re.findall(r"\[[^\]]*\]|[^.\[\]]+", field_path)


def _walk(node, segment: str):
    if segment.startswith("[") and "=" in segment:
        key, value = segment[1:-1].split("=", 1)
        (found,) = [item for item in node if item.get(key) == value]
        return found
    return node[segment.strip("[]")]


def _replace(resources: list[dict], replacement: dict) -> None:
    source = replacement["source"]
    (res,) = [r for r in resources if _selects(r, source)]
    value = res
    for segment in _path(source["fieldPath"]):
        value = _walk(value, segment)
    for target in replacement["targets"]:
        for res in (r for r in resources if _selects(r, target["select"])):
            for field_path in target["fieldPaths"]:
                *parents, last = _path(field_path)
                node = res
                for segment in parents:
                    node = _walk(node, segment)
                key = last.strip("[]")
                node[key] = int(value) if isinstance(node[key], int) else str(value)  # kustomize keeps the type


# ---------------------------------------------------------------------------- manifests and what they run
def jobs(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Job"]


def pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "job-completion-index" in item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", ""):
            env[item["name"]] = "0"  # the first pod's
    return env


def argv(container: dict) -> list[str]:
    """The process the kubelet starts: command (or the image's ENTRYPOINT) + args, $(VAR) expanded from env."""
    env = env_of(container)
    words = [*(container.get("command") or ENTRYPOINT), *container.get("args", [])]
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), w) for w in words]


def parse_cli(words: list[str]) -> tuple[str, dict]:
    """Parse `python -m job SUBCOMMAND ...` with the project's own Click commands (types and names checked)."""
    from job.cli import cli

    assert words[:3] == ENTRYPOINT, words
    name, *rest = words[3:]
    assert name in cli.commands, f"no subcommand {name!r}"
    ctx = cli.commands[name].make_context(name, list(rest), parent=click.Context(cli, info_name="job"))
    params = {k: v for k, v in ctx.params.items() if v is not None}
    if name in ("train", "doctor", "prepare"):  # the effective config must load and validate too
        values = {k: v for k, v in params.items() if k in RunConfig.field_names()}
        RunConfig.load(params.get("config"), **values)
    return name, params


def option(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words else None


def all_manifest_docs() -> dict[str, list[dict]]:
    return {str(p.relative_to(REPO)): load_docs(p.read_text()) for p in MANIFESTS}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every way the jobs reach a cluster: the files as they are, kustomize's renderings, and make's overlays
    with every setting changed (K8S_BUILD in a tmp folder)."""
    build = tmp_path_factory.mktemp("k8s-build")
    out = run(
        [
            "make",
            "-s",
            "k8s-overlays",
            f"K8S_BUILD={build}",
            "IMAGE=registry.example.com/ml/bloom",
            "TAG=v9.9.9",
            "GPUS=4",
            "CPUS=32",
            "MEMORY=256Gi",
            "NNODES=3",
        ]
    )
    assert out.returncode == 0, out.stderr
    found = all_manifest_docs()
    for root in KUSTOMIZATIONS:
        found[f"kustomize {root.relative_to(REPO)}"] = render(root)
    for name in ("train", "multinode", "prepare"):
        found[f"make overlay {name}"] = render(build / name)
    return found


# ----------------------------------------------------------------------------------------- Dockerfile
def instructions(text: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def dockerfile_problems(text: str) -> list[str]:
    """What hadolint does not check: the base pinned through the ARG, the last USER non-root by number."""
    problems = []
    ins = instructions(text)
    args = dict(v.split("=", 1) for k, v in ins if k == "ARG" and "=" in v)
    froms = [v.split()[0] for k, v in ins if k == "FROM"]
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), image)
        if not re.fullmatch(
            r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-(devel|runtime)(@sha256:[0-9a-f]{64})?", image
        ):
            problems.append(f"base image {image!r} is not a pinned pytorch/pytorch CUDA tag")
    users = [v.strip() for k, v in ins if k == "USER"]
    if not users:
        problems.append("no USER: the image runs as root")
    elif users[-1].split(":")[0] != str(UID):
        problems.append(f"last USER is {users[-1]!r}, not uid {UID}")
    return problems


def test_dockerfile_is_hadolint_clean():
    out = run([tool("hadolint"), str(DOCKERFILE)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    ins = instructions(text)
    get = lambda key: [v for k, v in ins if k == key]
    base = next(v.split("=", 1)[1] for v in get("ARG") if v.startswith("BASE_IMAGE="))
    torch_pin = re.search(r"^TORCH_VERSION \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert base.startswith(f"pytorch/pytorch:{torch_pin}-cuda") and base.endswith("-devel"), (base, torch_pin)
    assert json.loads(get("ENTRYPOINT")[-1]) == ENTRYPOINT
    cmd = json.loads(get("CMD")[-1])
    assert cmd == ["train", "--config", "h100", "--output-dir", "/output/run", "--resume", "auto"]
    assert parse_cli([*ENTRYPOINT, *cmd])[1]["resume"] == "auto"
    env = dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", " ".join(get("ENV"))))
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == env["PYTHONUNBUFFERED"] == "1"
    assert env["JOB_CACHE"] == "/cache/job" and env["HF_HOME"].startswith("/cache/")
    assert set(json.loads(get("VOLUME")[-1])) == {"/data", "/models", "/output", "/cache"}
    # The base image's CUDA torch stays: nothing pins another torch, and the installed one is a constraint.
    for name in ("requirements.txt", "constraints.txt"):
        assert not re.search(r"^torch\b", (REPO / name).read_text(), re.M), f"{name} names torch"
    install = next(v for v in get("RUN") if "pip install" in v)
    assert "-c constraints.txt" in install and "torch-pin" in install and "-r requirements.txt" in install
    for source in (w for v in get("COPY") for w in v.split()[:-1] if not w.startswith("--")):
        assert (REPO / source).exists(), source
        assert dockerignore_keeps(source.rstrip("/") + ("/cli.py" if source.endswith("/") else "")), source


@pytest.mark.parametrize(
    "edit, hadolint_fails",
    [
        (lambda t: t.replace("USER 1000:1000", "USER root"), True),  # DL3002: last USER should not be root
        (lambda t: t + "USER root\n", True),
        (lambda t: t.replace("USER 1000:1000\n", ""), False),  # hadolint misses it; our check does not
        (lambda t: re.sub(r"ARG BASE_IMAGE=\S+", "ARG BASE_IMAGE=pytorch/pytorch:latest", t), False),
    ],
    ids=["user-root", "user-root-appended", "no-user", "base-latest"],
)
def test_dockerfile_negative(tmp_path, edit, hadolint_fails):
    bad = tmp_path / "Dockerfile"
    bad.write_text(edit(DOCKERFILE.read_text()))
    assert bad.read_text() != DOCKERFILE.read_text()
    out = run([tool("hadolint"), str(bad)])
    assert (out.returncode != 0) == hadolint_fails, out.stdout
    if hadolint_fails:
        assert "DL3002" in out.stdout
    assert dockerfile_problems(bad.read_text()), "the broken Dockerfile passed our checks"


def dockerignore_keeps(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder matches what is inside."""
    keep = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            keep = negate
    return keep


def test_dockerignore_sends_only_the_project():
    for path in (
        "job/cli.py",
        "job/recipes/h100.json",
        "requirements.txt",
        "constraints.txt",
        "ds_config.json",
        "pyproject.toml",
    ):
        assert dockerignore_keeps(path), path
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "output/run/checkpoint-1/x",
        "runs/a",
        ".cache/job/x",
        "job/__pycache__/cli.cpython-311.pyc",
        "tests/test_deploy.py",
        ".pytest_cache/v",
    ):
        assert not dockerignore_keeps(path), path


# ------------------------------------------------------------------------------------- schema validation
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_are_strictly_valid(version):
    out = validate(MANIFESTS, version)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_renderings_are_strictly_valid(rendered, tmp_path, version):
    paths = []
    for i, (name, docs) in enumerate(rendered.items()):
        if name.startswith(("kustomize", "make")):
            paths.append(tmp_path / f"{i}.yaml")
            paths[-1].write_text(yaml.safe_dump_all(docs))
    out = validate(paths, version)
    assert out.returncode == 0, out.stdout + out.stderr


def test_misspelled_field_fails_strict_validation(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text((K8S / "job.yaml").read_text().replace("backoffLimit:", "backofLimit:"))
    strict = validate([bad], K8S_VERSIONS[-1])
    assert strict.returncode != 0 and "backofLimit" in strict.stdout + strict.stderr
    assert validate([bad], K8S_VERSIONS[-1], strict=False).returncode == 0  # why --strict is on


def test_makefile_validates_the_same_versions():
    text = (REPO / "Makefile").read_text()
    assert re.search(r"^K8S_VERSIONS \?= (.+)$", text, re.M).group(1).split() == K8S_VERSIONS
    assert re.search(r"^IMAGE \?= (\S+)", text, re.M).group(1) == DEFAULT_IMAGE


# ------------------------------------------------------------------------------------------- kustomize
@pytest.mark.skipif(KUBECTL is None, reason="no kubectl with kustomize v5: nothing to compare the fallback with")
def test_fallback_renderer_matches_kubectl(rendered):
    key = lambda r: (r["kind"], r["metadata"]["name"])
    for root in KUSTOMIZATIONS:
        assert sorted(kustomize(root), key=key) == sorted(render(root), key=key), root


def test_settings_are_set_in_one_place(rendered):
    """make's variables reach every field they size, through k8s/settings; the defaults are the files'."""
    by_name = {n: {j["metadata"]["name"]: j for j in jobs(d)} for n, d in rendered.items()}
    for name in ("make overlay train", "make overlay multinode"):
        (job,) = by_name[name].values()
        for c in _containers(job):
            assert c["image"] == "registry.example.com/ml/bloom:v9.9.9"
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "4" and env_of(c)["NPROC"] == "4"
        train = pod(job)["containers"][0]
        assert train["resources"]["requests"] == {"cpu": "32", "memory": "256Gi"}
        assert train["resources"]["limits"]["cpu"] == "32" and train["resources"]["limits"]["memory"] == "256Gi"
    multi = by_name["make overlay multinode"]["bloom-zh-pretrain-mn"]
    assert multi["spec"]["completions"] == multi["spec"]["parallelism"] == 3
    assert {env_of(c)["NNODES"] for c in _containers(multi)} == {"3"}
    (prep,) = by_name["make overlay prepare"].values()
    assert pod(prep)["containers"][0]["image"] == "registry.example.com/ml/bloom:v9.9.9"
    # Without settings, kustomize gives exactly the plain files (the image tag aside).
    for root, file in ((K8S, K8S / "job.yaml"), (K8S / "multinode", K8S / "multinode" / "job.yaml")):
        assert jobs(render(root)) == jobs(load_docs(file.read_text()))


def test_default_image_is_pinned_and_the_same_everywhere(rendered):
    images = set()
    for name, docs in rendered.items():
        if not name.startswith("make"):
            images |= {c["image"] for job in jobs(docs) for c in _containers(job)}
    assert len(images) == 1, images
    (image,) = images
    name, tag = _split_image(image)
    assert name == DEFAULT_IMAGE and tag and tag != "latest"
    for root in KUSTOMIZATIONS:
        k = yaml.safe_load((root / "kustomization.yaml").read_text())
        assert k["images"] == [{"name": DEFAULT_IMAGE, "newName": DEFAULT_IMAGE, "newTag": tag}]


# ----------------------------------------------------------------------------- what no schema checks
def test_commands_parse_with_the_project_cli(rendered):
    seen = set()
    for name, docs in rendered.items():
        for job in jobs(docs):
            for c in _containers(job):
                words = argv(c)
                assert "$(" not in " ".join(words), f"{name}: unexpanded variable in {words}"
                sub, _ = parse_cli(words)
                seen.add(sub)
    assert seen == {"doctor", "train", "prepare"}


def test_doctor_checks_the_flags_that_train_runs_with(rendered):
    for name, docs in rendered.items():
        for job in jobs(docs):
            spec = pod(job)
            if job["metadata"]["labels"]["app.kubernetes.io/component"] != "train":
                continue
            (doctor,), (train,) = spec["initContainers"], spec["containers"]
            assert doctor["args"][0] == "doctor" and train["args"][0] == "train", name
            assert doctor["args"][1:] == train["args"][1:], name
            assert option(train["args"], "--resume") == "auto", name
            assert doctor["image"] == train["image"] and doctor["volumeMounts"] == train["volumeMounts"]


def test_gpu_limits_agree_with_nproc_and_nodes(rendered):
    services = {d["metadata"]["name"]: d for docs in rendered.values() for d in docs if d["kind"] == "Service"}
    for name, docs in rendered.items():
        for job in jobs(docs):
            spec = pod(job)
            for c in _containers(job):
                words = argv(c)
                gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
                if words[3] == "prepare":
                    assert gpus is None, f"{name}: the prepare job takes no GPU"
                    continue
                assert gpus is not None and int(option(words, "--nproc")) == int(gpus), (name, c["name"])
                nnodes = int(option(words, "--nnodes") or 1)
                if nnodes == 1 and job["spec"].get("completionMode") != "Indexed":
                    continue
                # Multi-node: an Indexed Job of NNODES pods, rank = index, rendezvous at pod 0 via the Service.
                assert job["spec"]["completionMode"] == "Indexed"
                assert job["spec"]["completions"] == job["spec"]["parallelism"] == nnodes, name
                raw = c["args"]
                assert option(raw, "--node-rank") == "$(JOB_COMPLETION_INDEX)"
                service = services[spec["subdomain"]]
                assert service["metadata"]["name"] == spec["subdomain"] and service["spec"]["clusterIP"] == "None"
                selector = service["spec"]["selector"]
                assert selector == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
                assert option(words, "--master-addr") == f"{job['metadata']['name']}-0.{spec['subdomain']}"
                assert int(option(words, "--master-port")) == service["spec"]["ports"][0]["port"]


def test_volumes_claims_and_shm(rendered):
    claims = {d["metadata"]["name"] for d in load_docs((K8S / "pvcs.yaml").read_text())}
    for name, docs in rendered.items():
        for job in jobs(docs):
            spec = pod(job)
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounted = set()
            for c in _containers(job):
                for m in c["volumeMounts"]:
                    assert m["name"] in volumes, f"{name}: {c['name']} mounts undeclared volume {m['name']}"
                    mounted.add(m["name"])
                mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
                shm = mounts["/dev/shm"]["emptyDir"]
                assert shm["medium"] == "Memory" and shm["sizeLimit"], name
                env = env_of(c)
                for var in ("HF_HOME", "JOB_CACHE"):
                    assert any(env[var].startswith(p + "/") for p in mounts), f"{name}: {var} not on a volume"
                assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
            assert mounted == set(volumes), f"{name}: unused volumes {set(volumes) - mounted}"
            for v in volumes.values():
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, f"{name}: no PVC manifest"


def test_shutdown_timeout_fits_in_the_grace_period(rendered):
    for name, docs in rendered.items():
        for job in jobs(docs):
            grace = pod(job)["terminationGracePeriodSeconds"]
            for c in _containers(job):
                words = argv(c)
                if words[3] in ("train", "doctor"):
                    timeout = int(option(words, "--shutdown-timeout-s"))
                    assert timeout + 60 <= grace, f"{name}: --shutdown-timeout-s {timeout} vs grace {grace}"


def test_pod_failure_policy_uses_the_exit_codes_of_job_errors(rendered):
    for name, docs in rendered.items():
        for job in jobs(docs):
            spec = job["spec"]
            assert pod(job)["restartPolicy"] == "Never"  # podFailurePolicy requires it
            assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0
            assert spec["ttlSecondsAfterFinished"] > 0 and spec["podReplacementPolicy"] == "Failed"
            fail, ignore, conditions = set(), set(), []
            for rule in spec["podFailurePolicy"]["rules"]:
                codes = rule.get("onExitCodes", {})
                if codes:
                    assert codes["operator"] == "In"
                    (fail if rule["action"] == "FailJob" else ignore).update(codes["values"])
                    assert rule["action"] in ("FailJob", "Ignore")
                conditions += [(rule["action"], c["type"], c["status"]) for c in rule.get("onPodConditions", [])]
            assert ("Ignore", "DisruptionTarget", "True") in conditions, name
            if job["metadata"]["labels"]["app.kubernetes.io/component"] == "train":
                assert fail == {errors.EXIT_BAD_INPUT, errors.EXIT_DIVERGED}, name
                assert ignore == {errors.EXIT_PREEMPTED}, name
            else:
                assert fail == {errors.EXIT_BAD_INPUT} and not ignore, name


def test_pods_run_as_the_image_user_without_privileges(rendered):
    assert f"USER {UID}:{UID}" in DOCKERFILE.read_text()
    for name, docs in rendered.items():
        for job in jobs(docs):
            spec = pod(job)
            sc = spec["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID and sc["fsGroup"] == UID, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert spec["automountServiceAccountToken"] is False
            for c in _containers(job):
                csc = c["securityContext"]
                assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
                assert not csc.get("privileged") and "runAsUser" not in csc
                requests, limits = c["resources"]["requests"], c["resources"]["limits"]
                assert requests["cpu"] == limits["cpu"] and requests["memory"] == limits["memory"], name


# ----------------------------------------------------------------------------------- Makefile and CI
def make_dry(*args: str) -> str:
    out = run(["make", "-n", *args])
    assert out.returncode == 0, out.stderr
    return out.stdout


def image_commands(text: str, image: str) -> list[list[str]]:
    """The container argv of each `docker run ... IMAGE args` line of a dry run."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if words[:2] == ["docker", "run"] and image in words:
            found.append([*ENTRYPOINT, *words[words.index(image) + 1 :]])
    return found


def test_make_help_lists_the_deploy_targets():
    out = run(["make", "help"]).stdout
    for target in (
        "build",
        "push",
        "docker-train",
        "docker-smoke",
        "k8s-validate",
        "k8s-submit",
        "k8s-logs",
        "k8s-delete",
        "k8s-prepare",
        "k8s-multinode",
        "k8s-pvcs",
        "k8s-render",
    ):
        assert re.search(rf"^\s+{target}\s+\S", out, re.M), target


def test_make_refuses_latest():
    for target in ("build", "push", "docker-train", "k8s-overlays"):
        out = run(["make", target, "TAG=latest", "DOCKER=false", "KUBECTL=false", "K8S_BUILD=/nonexistent"])
        assert out.returncode != 0 and "never latest" in out.stderr, target


def test_make_docker_targets_run_the_cli_on_the_gpu(tmp_path):
    image = "registry.example.com/ml/bloom:v1"
    common = ["IMAGE=registry.example.com/ml/bloom", "TAG=v1", f"OUTPUT_DIR={tmp_path}/o", f"CACHE_DIR={tmp_path}/c"]
    train = make_dry(
        "docker-train",
        *common,
        f"MODEL_DIR={tmp_path}/m",
        f"DATA_DIR={tmp_path}/d",
        "RECIPE=h100",
        "NPROC=2",
        "ZERO=3",
        "MAX_STEPS=5",
        "DATA=/data/news.jsonl",
    )
    for needle in (
        "--gpus all",
        "--shm-size",
        f"{tmp_path}/m:/models:ro",
        f"{tmp_path}/d:/data:ro",
        f"{tmp_path}/o:/output",
        f"{tmp_path}/c:/cache",
    ):
        assert needle in train, needle
    ((_, params),) = [parse_cli(c) for c in image_commands(train, image)]
    assert params["model"] == "/models" and params["nproc"] == 2 and params["zero_stage"] == 3
    assert params["max_steps"] == 5 and params["data"] == "/data/news.jsonl" and params["resume"] == "auto"
    smoke = [parse_cli(c) for c in image_commands(make_dry("docker-smoke", *common), image)]
    assert [s for s, _ in smoke] == ["train", "train", "smoke"]
    assert all(p["deepspeed"].endswith("ds_config.json") and p["bf16"] for _, p in smoke[:2])
    assert smoke[2][1]["model"] == "/output/docker-smoke/final"
    assert (REPO / "ds_config.json").exists()  # /app/ds_config.json in the image
    build = make_dry("build", "IMAGE=registry.example.com/ml/bloom", "TAG=v1")
    assert "docker build -f docker/Dockerfile -t registry.example.com/ml/bloom:v1 ." in " ".join(build.split())


def test_make_train_needs_no_docker():
    out = make_dry("train", "RECIPE=quickstart")
    assert "docker" not in out and "-m job train --config quickstart" in out


def workflow(name: str) -> dict:
    data = yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def test_workflows():
    ci = workflow("ci.yml")
    (job,) = ci["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert any(step.get("run", "").strip() == "bash .ci/run" for step in job["steps"])
    gpu = workflow("gpu-smoke.yml")
    (job,) = gpu["jobs"].values()
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    runs = " ".join(step.get("run", "") for step in job["steps"])
    assert "make build" in runs and "make docker-smoke" in runs
