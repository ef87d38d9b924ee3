"""Write the kustomize overlay `make k8s-render` builds: a base from k8s/, the image, the settings make was given.

  python3 k8s/overlay.py OUT_DIR BASE IMAGE:TAG --released NAME:VERSION [--transformer DIR]... [KEY=VALUE]...

OUT_DIR/kustomization.yaml gets `resources: [BASE]`, `images:` turning the manifests' reference (NAME:VERSION,
the release every manifest names) into IMAGE:TAG, the non-empty KEY=VALUE pairs
merged into the `bloom-zh-settings` ConfigMap (created when BASE is a single file without one), the
components that a setting switches on (COMPONENTS below), and the settings transformers re-run after the
merge. It is what a person would write by hand for `kubectl apply -k`; kustomize has no command for it
(`kustomize edit` is not in kubectl), and make must not edit tracked files. Standard library only: the file
is JSON, which is YAML.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SETTINGS = "bloom-zh-settings"
# A setting that switches on a component of k8s/components/ (which reads the setting's value).
COMPONENTS = {
    "QUEUE": "kueue",
    "KUEUE_PRIORITY": "kueue-priority",
    "PRIORITY_CLASS": "priority-class",
    "GPU_PRODUCT": "gpu-product",
    "TOLERATE": "tolerations",
    "PULL_SECRET": "pull-secret",
    "RDMA": "rdma",
}
COMPONENTS_DIR = Path(__file__).resolve().parent / "components"


def overlay(
    out: Path, base: Path, image: str, released: str, transformers: list[Path], settings: dict[str, str]
) -> dict:
    def rel(path: Path) -> str:  # kustomize takes no absolute paths
        return os.path.relpath(path.resolve(), out.resolve())

    name, _, tag = image.rpartition(":")
    literals = [f"{k}={v}" for k, v in settings.items() if v]
    generator: dict = {"name": SETTINGS, "literals": literals}
    if base.is_file():  # a plain manifest (the prepare Job) has no settings to merge into
        generator["options"] = {
            "disableNameSuffixHash": True,
            "annotations": {"config.kubernetes.io/local-config": "true"},
        }
    else:
        generator["behavior"] = "merge"
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [rel(base)],
        "images": [{"name": released.rpartition(":")[0], "newName": name, "newTag": tag}],  # matched by name
        "configMapGenerator": [generator] if literals else [],
        "components": [rel(COMPONENTS_DIR / COMPONENTS[k]) for k, v in settings.items() if v and k in COMPONENTS],
        "transformers": [rel(t) for t in transformers],
    }
    return {k: v for k, v in kustomization.items() if v != []}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("base", type=Path)
    parser.add_argument("image", help="NAME:TAG")
    parser.add_argument("--released", required=True, help="NAME:VERSION, the image reference the manifests name")
    parser.add_argument("--transformer", type=Path, action="append", default=[])
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="empty values are left out")
    args = parser.parse_intermixed_args(argv)
    for image in (args.image, args.released):
        if ":" not in image.rpartition("/")[2]:
            parser.error(f"image {image!r} has no tag")
    settings = dict(s.split("=", 1) for s in args.settings)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(overlay(args.out, args.base, args.image, args.released, args.transformer, settings), indent=2)
    (args.out / "kustomization.yaml").write_text(f"{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
