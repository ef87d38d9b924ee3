"""Offline, strict validation of the custom resources in k8s/ (JobSet, TrainJob) against their CRDs' schemas.

kubernetes-validate knows only the built-in kinds and passes a JobSet or a TrainJob with a warning. The
openAPIV3Schema of each CRD is vendored in k8s/schemas/ (descriptions removed); this checks every document
of those kinds against it, as strictly as the API server's field validation: a field the schema does not
list is an error (kustomize and `kubectl apply` would otherwise drop a misspelt field without a word).
Not checked here: the CRDs' CEL rules (x-kubernetes-validations) and what the operators' webhooks add.

A TrainingRuntime (Kubeflow Trainer) is a JobSet template plus an ML policy: its `spec.template.spec` is checked
against the vendored JobSet schema's `spec`, its other fields against RUNTIME_SCHEMA below (the v2.3 API's
TrainingRuntimeSpec: mlPolicy with numNodes and torch, podGroupPolicy, template).

  python k8s/crd_validate.py FILE...                  validate the custom resources in FILEs (YAML streams)
  python k8s/crd_validate.py --vendor CRD.yaml SOURCE (re)write k8s/schemas/<group>_<version>_<Kind>.json;
                                                      SOURCE says where CRD.yaml came from (repo, tag, path)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parent / "schemas"


def schema_path(api_version: str, kind: str) -> Path:
    return SCHEMAS / f"{api_version.replace('/', '_')}_{kind}.json"


def is_builtin(api_version: str) -> bool:
    """Core and *.k8s.io groups are kubernetes-validate's; *.x-k8s.io and the rest are custom resources."""
    group = api_version.rpartition("/")[0]
    return "." not in group or (group.endswith(".k8s.io") and not group.endswith(".x-k8s.io"))


def strict(schema):
    """The schema with `additionalProperties: false` wherever it lists properties and keeps no unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    keeps_unknown = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not keeps_unknown:
        out["additionalProperties"] = False
    return out


RUNTIME_KINDS = {"TrainingRuntime", "ClusterTrainingRuntime"}
RUNTIME_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "trainer.kubeflow.org/v1alpha1"},
        "kind": {"enum": sorted(RUNTIME_KINDS)},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["template"],
            "properties": {
                "mlPolicy": {
                    "type": "object",
                    "properties": {
                        "numNodes": {"type": "integer", "minimum": 1},
                        "torch": {"type": "object", "properties": {"numProcPerNode": {}, "elasticPolicy": {}}},
                        "mpi": {"type": "object"},
                    },
                },
                "podGroupPolicy": {"type": "object"},
                "template": {
                    "type": "object",
                    "required": ["spec"],
                    "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}},
                },
            },
        },
    },
}


def runtime_errors(doc: dict) -> list[str]:
    """A TrainingRuntime: its own fields, then its JobSet template against the JobSet schema."""
    jobset = json.loads(schema_path("jobset.x-k8s.io/v1alpha2", "JobSet").read_text())
    found = [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in jsonschema.Draft7Validator(strict(RUNTIME_SCHEMA)).iter_errors(doc)
    ]
    template = doc.get("spec", {}).get("template", {}).get("spec", {})
    validator = jsonschema.Draft7Validator(strict(jobset["properties"]["spec"]))
    found += [
        f"spec.template.spec.{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(template)
    ]
    return found


def errors(doc: dict) -> list[str]:
    """Why `doc` is invalid (empty when valid); a custom resource without a vendored schema is an error."""
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if kind in RUNTIME_KINDS:
        return runtime_errors(doc)
    path = schema_path(api_version, kind)
    if not path.exists():
        return [f"no schema for {api_version} {kind} in {SCHEMAS} (vendor its CRD: see this file's docstring)"]
    validator = jsonschema.Draft7Validator(strict(json.loads(path.read_text())))
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def validate_files(files: list[str]) -> int:
    failed = checked = 0
    for file in files:
        for doc in yaml.safe_load_all(Path(file).read_text()):
            if not doc or is_builtin(doc.get("apiVersion", "")):
                continue
            checked += 1
            name = f"{file}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            for error in errors(doc):
                print(f"{name}: {error}", file=sys.stderr)
                failed += 1
    print(f"custom resources: {checked} checked against k8s/schemas, {failed} error(s)")
    return 1 if failed else 0


def vendor(crd_file: str, source: str) -> Path:
    def without_descriptions(node):
        if isinstance(node, dict):
            return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
        return [without_descriptions(x) for x in node] if isinstance(node, list) else node

    crd = yaml.safe_load(Path(crd_file).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    api_version, kind = f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"]
    schema = without_descriptions(version["schema"]["openAPIV3Schema"])
    out = schema_path(api_version, kind)
    comment = f"openAPIV3Schema of {api_version} {kind} from {source}, descriptions removed (k8s/crd_validate.py)"
    out.write_text(json.dumps({"$comment": comment, **schema}, separators=(",", ":"), sort_keys=True) + "\n")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vendor", nargs=2, metavar=("CRD_YAML", "SOURCE"), help="vendor a CRD's schema")
    parser.add_argument("files", nargs="*")
    args = parser.parse_args()
    if args.vendor:
        print(f"wrote {vendor(*args.vendor)}")
        return 0
    return validate_files(args.files)


if __name__ == "__main__":
    sys.exit(main())
