"""Only complete checkpoints count: for resume and for rotation."""

from __future__ import annotations

from job.core import checkpoints


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


def _state(checkpoint, step, max_steps):
    (checkpoint / "trainer_state.json").write_text(f'{{"global_step": {step}, "max_steps": {max_steps}}}')


def test_finished_uses_max_steps_else_the_trainers_own_count(tmp_path):
    path = _make(tmp_path, 40)
    _state(path, 40, 40)
    assert checkpoints.finished(path, -1) and checkpoints.finished(path, 40)
    assert not checkpoints.finished(path, 60)  # --max-steps raised on resume: train on
    _state(path, 30, 40)
    assert not checkpoints.finished(path, -1)
    assert not checkpoints.finished(None, 10) and not checkpoints.finished(_make(tmp_path, 50), 10)  # no state


def test_world_size_counts_the_ranks_that_wrote_a_checkpoint(tmp_path):
    path = _make(tmp_path, 4)
    assert checkpoints.world_size(path) is None and checkpoints.zero_world_size(path) is None
    (path / "rng_state.pth").write_bytes(b"")
    assert checkpoints.world_size(path) == 1
    for rank in range(4):
        (path / f"rng_state_{rank}.pth").write_bytes(b"")
    assert checkpoints.world_size(path) == 4
    (path / "latest").write_text("global_step4")
    (path / "global_step4").mkdir()
    for rank in range(2):
        (path / "global_step4" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert checkpoints.zero_world_size(path) == 2
