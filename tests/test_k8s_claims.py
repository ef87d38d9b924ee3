"""tools/k8s_claims.py: a multi-node target refuses, before applying anything, claims one node only can mount."""

from __future__ import annotations

import io
import json

import pytest

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
    assert line.startswith("error: 2 nodes need ReadWriteMany claims") and " -- " in line
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
