"""Only complete checkpoints count: for resume and for rotation."""

from __future__ import annotations

from job import checkpoints


def _make(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * 10)
    if complete:
        checkpoints.mark_complete(path, step)
    return path


def test_latest_complete_skips_partial_and_sorts_numerically(tmp_path):
    _make(tmp_path, 9)
    _make(tmp_path, 10)
    _make(tmp_path, 30, complete=False)  # a save killed half-way
    assert checkpoints.latest_complete(tmp_path).name == "checkpoint-10"
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-30"]


def test_rotation_keeps_newest_complete_and_drops_partial(tmp_path):
    for step in (10, 20, 30):
        _make(tmp_path, step)
    _make(tmp_path, 40, complete=False)
    checkpoints.rotate(tmp_path, keep=2)
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-30"]
    checkpoints.rotate(tmp_path, keep=0)  # never fewer than one
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == ["checkpoint-30"]
