"""Only complete checkpoints count: for resume and for rotation."""

from __future__ import annotations

import pytest

from job.core import checkpoints
from job.core.errors import JobError


def _make(root, step, complete=True):
    """A checkpoint as the job writes one: claimed (`begin`), written, then marked complete."""
    checkpoints.begin(root, step)
    path = root / f"checkpoint-{step}"
    (path / "model.safetensors").write_bytes(b"x" * 10)
    _state(path, step, 1000)
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
    no_state = _make(tmp_path, 50)
    (no_state / "trainer_state.json").unlink()
    assert not checkpoints.finished(None, 10) and not checkpoints.finished(no_state, 10)


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


def test_a_folder_the_job_did_not_begin_is_never_deleted(tmp_path):
    """Another tool's `checkpoint-500/` (no claim of this job's) survives the clean-up and the rotation."""
    foreign = tmp_path / "checkpoint-500"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"theirs")
    for step in (10, 20, 30):
        _make(tmp_path, step)
    _make(tmp_path, 40, complete=False)  # ours, killed mid-save
    assert checkpoints.remove_incomplete(tmp_path) == [tmp_path / "checkpoint-40"]
    checkpoints.rotate(tmp_path, keep=1)
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == ["checkpoint-30", "checkpoint-500"]
    assert (foreign / "weights.bin").read_bytes() == b"theirs"


def test_a_checkpoint_is_trusted_only_while_its_contents_match_its_marker(tmp_path):
    good = _make(tmp_path, 10)
    for step, damage, why in [
        (20, lambda p: (p / "model.safetensors").write_bytes(b"x" * 3), "model.safetensors is 3 bytes"),
        (30, lambda p: _state(p, 31, 1000), "trainer_state.json says step 31, COMPLETE says 30"),
        (40, lambda p: (p / "trainer_state.json").write_text("{not json"), "unreadable"),
        (50, lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
        (60, lambda p: (p / checkpoints.MARKER).write_text("[]"), "COMPLETE says None"),
    ]:
        damage(_make(tmp_path, step))
        assert why in dict(checkpoints.damaged_checkpoints(tmp_path))[tmp_path / f"checkpoint-{step}"]
        assert checkpoints.latest_complete(tmp_path) == good  # the newest that still matches
    (tmp_path / "checkpoint-10" / "optimizer.pt").write_bytes(b"an extra file is no damage")
    assert checkpoints.complete_checkpoints(tmp_path) == [good]


def test_marking_complete_gives_the_files_the_umasks_permissions(tmp_path):
    """Libraries write through mkstemp (0600); the job's files are for group and others to read as well."""
    import os
    import stat

    path = _make(tmp_path, 5, complete=False)
    (path / "model.safetensors").chmod(0o600)
    old = os.umask(0o022)
    try:
        checkpoints.mark_complete(path, 5)
    finally:
        os.umask(old)
    assert stat.S_IMODE((path / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


def _outside(tmp_path):
    """A folder outside the run folder, holding a file and the job's own writing marker."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "theirs.bin").write_bytes(b"theirs")
    (outside / checkpoints.WRITING).touch()
    return outside, sorted((p.name, p.read_bytes()) for p in outside.iterdir())


def test_a_linked_checkpoint_is_neither_written_nor_deleted_nor_reported_removed(tmp_path):
    run = tmp_path / "run"
    _make(run, 5)
    outside, before = _outside(tmp_path)
    (run / "checkpoint-7").symlink_to(outside, target_is_directory=True)
    assert checkpoints.remove_incomplete(run) == []  # nothing removed, so nothing reported removed
    assert checkpoints.rotate(run, keep=0) == []
    with pytest.raises(JobError, match=r"checkpoint-7 is a symbolic link .*remove the link"):
        checkpoints.begin(run, 7)  # where the Trainer would save through it
    assert sorted((p.name, p.read_bytes()) for p in outside.iterdir()) == before
    assert [p.name for p in checkpoints.all_checkpoints(run)] == ["checkpoint-5"]


def test_the_report_of_removals_names_only_what_is_gone(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _make(run, 9, complete=False)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", lambda path, ignore_errors=False: None)  # a deletion that fails
    assert checkpoints.remove_incomplete(run) == []


@pytest.mark.parametrize("name", ["final", "final.partial"])
def test_a_linked_export_or_staging_folder_is_refused_and_left_alone(tmp_path, name):
    from tests.test_model_card import _checkpoint

    run = tmp_path / "run"
    checkpoint = _checkpoint(run)
    outside, before = _outside(tmp_path)
    (run / name).symlink_to(outside, target_is_directory=True)
    with pytest.raises(JobError, match=f"{name} is a symbolic link"):
        checkpoints.export_final(checkpoint, run)
    assert sorted((p.name, p.read_bytes()) for p in outside.iterdir()) == before
    assert (run / name).is_symlink()
