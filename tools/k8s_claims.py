"""The claims of k8s/pvcs.yaml with this cluster's storage class and access mode, and the refusal, before anything
is applied, of a multi-node run on claims that one node only can mount.

    python -m tools.k8s_claims --render k8s/pvcs.yaml --access-mode ReadWriteMany --storage-class nfs > PVCS
    kubectl get pvc -l app.kubernetes.io/part-of=bloom-zh -o json | python -m tools.k8s_claims --nodes 4 PVCS -

`make k8s-multinode` and `make k8s-trainjob` pass the node count, `make k8s-prepare` the prepare pods it runs at once
(each may land on another node).

Reads PersistentVolumeClaims from YAML streams or `kubectl get -o json` lists (`-`: stdin), the claims that exist
as well as the ones about to be created (an existing claim's access mode cannot change: `kubectl apply` keeps it).
With more than one node every claim must be ReadWriteMany; a ReadWriteOnce one fails on the second node with a
Multi-Attach error. Exit 0, or 2 with one line naming the claims and the fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

SHARED = "ReadWriteMany"


def claims(text: str) -> dict[str, list[str]]:
    """{claim name: access modes} of every PersistentVolumeClaim in a YAML/JSON stream (lists unpacked)."""
    found: dict[str, list[str]] = {}
    for doc in yaml.safe_load_all(text):
        items = doc.get("items", []) if isinstance(doc, dict) and doc.get("kind", "").endswith("List") else [doc]
        for item in items:
            if isinstance(item, dict) and item.get("kind") == "PersistentVolumeClaim":
                modes = (item.get("spec") or {}).get("accessModes") or []
                found[item["metadata"]["name"]] = list(modes)
    return found


def check(found: dict[str, list[str]], nodes: int) -> str | None:
    """The one-line refusal, or None when every claim suits `nodes` nodes."""
    if nodes <= 1:
        return None
    single = sorted(
        f"{name} ({'/'.join(modes) or 'no access mode'})" for name, modes in found.items() if SHARED not in modes
    )
    if not single:
        return None
    return (
        f"error: {nodes} pods at once, on up to {nodes} nodes, need ReadWriteMany claims; {', '.join(single)} can be "
        "mounted on one node only (a pod on another node fails with Multi-Attach) -- create them with an RWX storage "
        "class: K8S_ACCESS_MODE=ReadWriteMany K8S_STORAGE_CLASS=<class> (an existing claim's mode cannot change: "
        "delete it first, after copying out what it holds); make k8s-prepare: or K8S_PREPARE_PARALLELISM=1"
    )


ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany")


def render(text: str, access_mode: str, storage_class: str | None) -> str:
    """The claims with `access_mode` and, when given, `storage_class` (else the cluster's default class)."""
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    for doc in docs:
        doc["spec"]["accessModes"] = [access_mode]
        if storage_class:
            doc["spec"]["storageClassName"] = storage_class
    return yaml.safe_dump_all(docs, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", metavar="PVCS_YAML", help="print these claims with the settings below")
    parser.add_argument("--access-mode", choices=ACCESS_MODES, default="ReadWriteOnce")
    parser.add_argument("--storage-class", default=None, help="storageClassName (default: the cluster's default)")
    parser.add_argument(
        "--nodes", type=int, help="pods at once, on as many nodes at worst: refuse claims one node only can mount"
    )
    parser.add_argument("files", nargs="*", help="YAML or `kubectl get -o json` files; - for stdin")
    args = parser.parse_args(argv)
    if args.render:
        print(render(Path(args.render).read_text(encoding="utf-8"), args.access_mode, args.storage_class), end="")
        return 0
    if args.nodes is None or not args.files:
        parser.error("--nodes N FILE... (or --render PVCS_YAML)")
    found: dict[str, list[str]] = {}
    for name in args.files:
        found.update(claims(sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")))
    refusal = check(found, args.nodes)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
