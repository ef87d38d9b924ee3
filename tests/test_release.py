"""The release: one image reference everywhere, and a publication that waits for CI and for the image's own test.

- Every manifest names ghcr.io/<owner>/<repo>:VERSION, VERSION being pyproject.toml's, so that `kubectl apply -f
  k8s/job.yaml` works as typed: the raw files, every kustomize rendering, `make k8s-render` without IMAGE or TAG,
  and the Makefile's IMAGE:TAG default agree, and .github/workflows/release.yml publishes exactly that tag for the
  git tag vVERSION (its docker/metadata-action rules, read here) and refuses any other release tag (its own step,
  run here with bash).
- The workflow runs CI first (`needs`), pushes by digest, runs docker/image-test.sh on that digest, and only then
  moves the tags.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_deploy import (
    K8S,
    KUSTOMIZATIONS,
    MAKE_SETTINGS,
    MANIFESTS,
    REPO,
    containers,
    kustomize,
    load_docs,
    make_var,
    pods,
    rendered,  # noqa: F401 (the fixture: files, kustomize and make renderings)
    run,
    tracked_files,
    workloads,
)

RELEASE = REPO / ".github" / "workflows" / "release.yml"
CI = REPO / ".github" / "workflows" / "ci.yml"
IMAGE_TEST = REPO / "docker" / "image-test.sh"
# Every file that names the image: the workloads and the tools applied once (make's K8S_ONCE).
IMAGE_FILES = [*MANIFESTS, *(REPO / p for p in make_var("K8S_ONCE").split())]
VERSION = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def workflow(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def images_of(docs: list[dict]) -> set[str]:
    return {c["image"] for w in workloads(docs) for spec, _ in pods(w) for c in containers(spec)}


def release_image() -> str:
    """The one reference: the image of k8s/job.yaml, which every other manifest must repeat."""
    (image,) = images_of(load_docs((K8S / "job.yaml").read_text()))
    return image


# ------------------------------------------------------------------------------- one image reference
def test_every_manifest_names_the_release_of_pyproject_version(rendered):  # noqa: F811
    image = release_image()
    assert re.fullmatch(rf"ghcr\.io/[a-z0-9-]+/[a-z0-9-]+:{re.escape(VERSION)}", image), image
    assert f"{make_var('IMAGE')}:{make_var('TAG')}" == image  # make's default
    for path in IMAGE_FILES:
        found = images_of(load_docs(path.read_text()))
        assert found in (set(), {image}), f"{path.relative_to(REPO)} names {found}, not {image}"
    for root in KUSTOMIZATIONS:
        assert images_of(kustomize(root)) == {image}, root
    for name, docs in rendered.items():  # make's IMAGE and TAG reach every container they render
        if name.startswith("make"):
            assert images_of(docs) == {f"{MAKE_SETTINGS['IMAGE']}:{MAKE_SETTINGS['TAG']}"}, name
    # Every document that names an image names this one (the Service and the claims name none).
    image_line = re.compile(r"^[\s-]*image:\s*\S", re.M)
    named = {
        p for p in tracked_files() if p.suffix == ".yaml" and p.is_relative_to(K8S) and image_line.search(p.read_text())
    }
    assert named <= set(IMAGE_FILES), named - set(IMAGE_FILES)


def test_make_k8s_render_defaults_to_that_reference(tmp_path):
    """`make k8s-submit` and friends, with no IMAGE or TAG, apply the same reference as `kubectl apply -f`."""
    out = run(["make", "-s", "k8s-render", f"K8S_BUILD={tmp_path}"])
    assert out.returncode == 0, out.stdout + out.stderr
    for name in make_var("K8S_OVERLAYS").split():
        assert images_of(load_docs((tmp_path / f"{name}.yaml").read_text())) == {release_image()}, name


def released_tags(commit: str, git_tags: list[str], branch: str | None = "main") -> set[str]:
    """The tags .github/workflows/release.yml publishes for a commit, from its docker/metadata-action rules."""
    release = workflow(RELEASE)
    triggers = release["on"]
    assert "paths-ignore" not in triggers["push"] and "paths" not in triggers["push"], "a commit of main unpublished"
    assert git_tags == [] or any(
        re.fullmatch(p.replace("*", ".*"), t) for p in triggers["push"]["tags"] for t in git_tags
    )
    (meta,) = [
        s for j in release["jobs"].values() for s in j.get("steps", []) if "metadata-action" in s.get("uses", "")
    ]
    assert "latest=false" in meta["with"]["flavor"]
    published = set()
    for rule in meta["with"]["tags"].split():
        kind, *params = rule.split(",")
        params = dict(p.split("=", 1) for p in params)
        kind = kind.removeprefix("type=")
        if kind == "sha":
            assert params.get("format", "short") == "short"
            published.add(params.get("prefix", "sha-") + commit[:7])
        elif kind == "ref" and params["event"] == "branch":
            if branch in triggers["push"]["branches"]:
                published.add(branch)
        elif kind == "semver":
            for tag in git_tags:
                m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", tag)
                if m:
                    major, minor, patch = m.groups()
                    published.add(
                        params["pattern"]
                        .replace("{{version}}", f"{major}.{minor}.{patch}")
                        .replace("{{major}}", major)
                        .replace("{{minor}}", minor)
                    )
        else:
            raise AssertionError(f"unknown metadata-action rule {rule}")
    return published


def test_the_release_tag_publishes_the_manifests_tag():
    assert VERSION in released_tags("0" * 40, [f"v{VERSION}"], branch=None)
    assert VERSION not in released_tags("0" * 40, [], branch="main")  # a push to main never moves a release tag
    assert "latest" not in released_tags("0" * 40, [f"v{VERSION}"])


def _name_step() -> dict:
    (step,) = [s for s in workflow(RELEASE)["jobs"]["image"]["steps"] if s.get("id") == "name"]
    return step


@pytest.mark.parametrize(
    "ref_type, ref_name, repository, rc, says",
    [
        ("tag", f"v{VERSION}", "bloom-zh/bloom-zh-job", 0, None),
        ("tag", "v9.9.9", "bloom-zh/bloom-zh-job", 1, f"::error::tag v9.9.9 is not v{VERSION}"),
        ("branch", "main", "bloom-zh/bloom-zh-job", 0, None),
        ("branch", "main", "Fork-Owner/bloom-zh-job", 0, "::warning::this repository publishes ghcr.io/fork-owner/"),
    ],
)
def test_the_workflow_refuses_a_release_tag_that_is_not_the_version(tmp_path, ref_type, ref_name, repository, rc, says):
    """The workflow's own step, run with bash in the repository as the runner would."""
    output = tmp_path / "github_output"
    env = {
        **os.environ,
        "GITHUB_REF_TYPE": ref_type,
        "GITHUB_REF_NAME": ref_name,
        "GITHUB_REPOSITORY": repository,
        "GITHUB_OUTPUT": str(output),
    }
    done = subprocess.run(
        ["bash", "-e", "-c", _name_step()["run"]], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == rc, done.stdout + done.stderr
    if says:
        assert says in done.stdout, done.stdout
    else:
        assert "::" not in done.stdout, done.stdout  # neither an error nor a warning for the project's own repo
    if rc == 0:
        assert output.read_text() == f"image=ghcr.io/{repository.lower()}\n"
    if repository == "bloom-zh/bloom-zh-job":
        assert release_image() == f"ghcr.io/{repository}:{VERSION}"


# ------------------------------------------------------------------------- publish after CI and test
def test_images_are_published_only_after_ci_and_their_own_test():
    release, ci = workflow(RELEASE), workflow(CI)
    assert release["jobs"]["ci"]["uses"] == "./.github/workflows/ci.yml"
    assert "workflow_call" in ci["on"] and "push" not in ci["on"], "pushes run CI once, inside the release"
    assert "pull_request" in ci["on"]
    image = release["jobs"]["image"]
    assert image["needs"] in ("ci", ["ci"])
    steps = image["steps"]
    index = {s.get("name", s.get("uses")): i for i, s in enumerate(steps)}
    (build,) = [i for i, s in enumerate(steps) if "build-push-action" in s.get("uses", "")]
    outputs = dict(kv.split("=", 1) for kv in steps[build]["with"]["outputs"].split(",")[1:])
    assert outputs["push-by-digest"] == "true" and outputs["push"] == "true" and "tags" not in steps[build]["with"]
    digest = f"${{{{ steps.{steps[build]['id']}.outputs.digest }}}}"
    (test,) = [i for i, s in enumerate(steps) if "docker/image-test.sh" in s.get("run", "")]
    assert digest in steps[test]["env"]["IMAGE"] and "BUILD=no" in steps[test]["run"]
    (tags,) = [i for i, s in enumerate(steps) if "imagetools create" in s.get("run", "")]
    assert steps[tags]["env"]["IMAGE"] == steps[test]["env"]["IMAGE"]  # the tags go to the digest that passed
    assert "steps.meta.outputs.tags" in steps[tags]["env"]["TAGS"]
    assert index["image name, and the release tag against pyproject.toml"] < build < test < tags
    assert all("if" not in s for s in steps[build:]), "no step after the build is skipped on its own"


def test_image_test_without_build_tests_the_image_it_is_given(tmp_path):
    """BUILD=no (the release) runs no build: an image missing from the engine's storage ends it in one line,
    before any step that builds. A stand-in `podman` first on PATH records what the script asks of it."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    engine = bin_dir / "podman"
    engine.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncase "$*" in *"image inspect"*) exit 125;; esac\n')
    engine.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "ENGINE": "podman",
        "BUILD": "no",
        "IMAGE": "ghcr.io/acme/bloom@sha256:" + "0" * 64,
        "CACHE": str(tmp_path / "cache"),
    }
    done = subprocess.run(["bash", str(IMAGE_TEST)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f"FAIL: no image {env['IMAGE']} in podman's storage")
    asked = calls.read_text().splitlines()
    assert all(" build " not in f" {c} " and not c.startswith("import") for c in asked), asked
    assert any(f"image inspect --format {{{{.Size}}}} {env['IMAGE']}" in c for c in asked), asked
    done = subprocess.run(
        ["bash", str(IMAGE_TEST)], cwd=REPO, env={**env, "BUILD": "maybe"}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "BUILD=maybe: yes or no" in done.stderr, done.stderr


def test_the_readme_bump_changes_every_reference(tmp_path):
    """README.md's "Cutting a release" commands (all but the git line), run on a copy of pyproject.toml and k8s/:
    afterwards the copy names the new version everywhere, so the release tag publishes what the manifests pull."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"### Cutting a release\n.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = [ln for ln in block.splitlines() if not ln.startswith("git commit")]
    assert lines[0].startswith(f"old={VERSION} "), "the example starts from the current version"
    copy = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(copy)], check=True)
    (copy / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    for path in IMAGE_FILES:
        (copy / path.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(REPO)).write_text(path.read_text())
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    done = subprocess.run(["bash", "-e", "-c", "\n".join(lines)], cwd=copy, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    new = re.search(r"new=(\S+)", lines[0]).group(1)
    assert f'version = "{new}"' in (copy / "pyproject.toml").read_text()
    for path in IMAGE_FILES:
        found = set(re.findall(r"^[\s-]*image:\s*(\S+)", (copy / path.relative_to(REPO)).read_text(), re.M))
        assert found in (set(), {release_image().replace(f":{VERSION}", f":{new}")}), path
