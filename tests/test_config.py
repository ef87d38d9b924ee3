"""One typed config: recipes, overrides, validation, and the DeepSpeed / TrainingArguments it renders."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from job.core.config import RECIPES_DIR, RunConfig
from job.core.errors import EXIT_BAD_INPUT, JobError
from job.run.deepspeed_config import check_batch_arithmetic, deepspeed_config
from tests.conftest import REPO, launch_of


def test_precedence_defaults_recipe_flags():
    cfg = RunConfig.load("tutorial", grad_accum=2)
    assert (cfg.max_samples, cfg.max_length, cfg.packing) == (10000, 384, False)  # the recipe
    assert cfg.grad_accum == 2  # the flag wins
    assert cfg.seed == RunConfig().seed  # the default


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.json")))
def test_every_recipe_loads(recipe):
    RunConfig.load(recipe)


def test_unknown_key_and_wrong_type_are_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_lenght": 5}))
    with pytest.raises(JobError, match=r"unknown config key.*max_lenght"):
        RunConfig.load(str(path))
    path.write_text(json.dumps({"max_length": "long"}))
    with pytest.raises(JobError, match="expected int"):
        RunConfig.load(str(path))
    with pytest.raises(JobError, match="max-length 1 is not at least 2"):
        RunConfig.load(max_length=1)


def test_zero_stage_switch_from_one_file():
    assert deepspeed_config(RunConfig.load())["zero_optimization"]["stage"] == 2
    z3 = deepspeed_config(RunConfig.load(zero_stage=3))["zero_optimization"]
    assert z3["stage"] == 3 and z3["stage3_gather_16bit_weights_on_model_save"] is True
    z1 = deepspeed_config(RunConfig.load(zero_stage=1))["zero_optimization"]
    assert z1["stage"] == 1 and not any(k.startswith("stage3_") for k in z1)
    assert "optimizer" not in deepspeed_config(RunConfig.load())  # the Trainer's fused AdamW owns it
    assert deepspeed_config(RunConfig.load(deepspeed="none")) is None


def test_bad_deepspeed_files(tmp_path):
    broken = tmp_path / "ds.json"
    broken.write_text("{not json")
    with pytest.raises(JobError, match="not valid JSON"):
        deepspeed_config(RunConfig.load(deepspeed=str(broken)))
    broken.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    with pytest.raises(JobError, match=r"unknown key.*zero_optimisation"):
        deepspeed_config(RunConfig.load(deepspeed=str(broken)))
    broken.write_text(json.dumps({"train_batch_size": 100, "zero_optimization": {"stage": 2}}))
    with pytest.raises(JobError, match=r"train_batch_size=100 but batch 16 x accumulation 4 x 2 processes = 128"):
        cfg = RunConfig.load(deepspeed=str(broken))
        check_batch_arithmetic(cfg, launch_of(cfg, nproc=2))
    cfg = RunConfig.load(deepspeed=str(broken), grad_accum=25, per_device_batch_size=2)
    check_batch_arithmetic(cfg, launch_of(cfg, nproc=2))


def test_training_arguments_follow_the_config(tmp_path):
    cfg = RunConfig.load(output_dir=str(tmp_path), per_device_batch_size=3, grad_accum=5, seed=7, deepspeed="none")
    from job.run.training_args import training_arguments

    args = training_arguments(cfg, use_cpu=True)  # (with DeepSpeed this would start a process group)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.seed) == (3, 5, 7)
    assert args.save_total_limit is None  # rotation counts complete checkpoints only (job.checkpoints)
    assert args.include_num_input_tokens_seen == "non_padding"
    assert args.deepspeed is None and args.use_cpu


def test_written_config_round_trips(tmp_path):
    cfg = RunConfig.load("quickstart", output_dir=str(tmp_path))
    cfg.write(tmp_path / "run_config.json")
    assert RunConfig.load(str(tmp_path / "run_config.json")) == cfg


def test_every_field_is_declared_once_with_help_and_the_choices_match_their_modules():
    import dataclasses
    import typing

    from job.core.config import Attention, Preset, resumable_fields
    from job.model.attention import KINDS
    from job.model.build import PRESET_SHAPES

    for f in dataclasses.fields(RunConfig):
        assert f.metadata["help"], f.name
    assert typing.get_args(Preset) == tuple(PRESET_SHAPES)
    assert typing.get_args(Attention) == ("auto", *KINDS)
    assert {"max_steps", "save_steps", "nproc"} <= resumable_fields()
    assert not {"learning_rate", "preset", "max_length", "model", "data"} & resumable_fields()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": 0}, "--learning-rate 0.0 is not above 0"),
        ({"adam_beta2": 1.0}, r"--adam-beta2 1.0 is not in \[0, 1\)"),
        ({"max_steps": 0}, "--max-steps 0 is not -1 or at least 1"),
        ({"max_nonfinite_steps": 0}, "is not at least 1"),
        ({"preset": "huge"}, "--preset 'huge' is not one of tiny, bloom-389m-zh, bloom-800m-zh"),
        ({"zero_stage": 3, "deepspeed": "none"}, "has no effect with --deepspeed none"),
    ],
)
def test_ranges_and_choices_come_from_the_field_metadata(values, message):
    with pytest.raises(JobError, match=message):
        RunConfig.load(**values)


def test_training_arg_pass_through_is_checked_and_coerced(tmp_path):
    from job.run.training_args import training_arguments

    cfg = RunConfig.load(
        output_dir=str(tmp_path), deepspeed="none", training_args={"ddp_timeout": "3600", "adam_beta1": "0.8"}
    )
    args = training_arguments(cfg, use_cpu=True)
    assert (args.ddp_timeout, args.adam_beta1) == (3600, 0.8)
    for bad, message in (
        ({"no_such": 1}, "not a TrainingArguments field"),
        ({"seed": 3}, "set by the run config"),
        ({"ddp_timeout": "soon"}, "does not fit its type"),
    ):
        with pytest.raises(JobError, match=message):
            training_arguments(RunConfig.load(output_dir=str(tmp_path), deepspeed="none", training_args=bad), True)


def test_deepspeed_blocks_must_agree_with_the_run(tmp_path):
    from job.run.deepspeed_config import check_optimizer_blocks

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"params": {"lr": "auto", "weight_decay": 0.5}}}))
    with pytest.raises(JobError, match=r"optimizer.params.weight_decay=0.5 but the run has --weight-decay=0.01"):
        check_optimizer_blocks(RunConfig.load(deepspeed=str(path)))
    check_optimizer_blocks(RunConfig.load(deepspeed=str(path), weight_decay=0.5))
    path.write_text(json.dumps({"scheduler": {"params": {"warmup_num_steps": 5}}}))
    with pytest.raises(JobError, match="warmup_num_steps=5 but the run has --warmup-steps=10"):
        check_optimizer_blocks(RunConfig.load(deepspeed=str(path)))


def test_structured_values_are_typed_and_keep_their_json_form(tmp_path):
    """Parsed once at the boundary: readers get typed values; run_config.json keeps the text an older run wrote."""
    from job.core.config import DEFAULT_DS_CONFIG, ResumeFrom
    from job.core.data_spec import DataSpec, Source

    cfg = RunConfig.load(
        data="4:wiki=/data/wiki,1:replay=org/replay",
        report_to="tensorboard, wandb",
        dataset_ids="a/b, c/d",
        flex_kernel_options='{"fwd_num_warps": 8}',
        resume=str(tmp_path),
    )
    assert cfg.data == DataSpec((Source("wiki", 4.0, "/data/wiki"), Source("replay", 1.0, "org/replay")), True)
    assert cfg.data.probabilities() == [0.8, 0.2]
    assert cfg.report_to == ("tensorboard", "wandb") and cfg.dataset_ids == ("a/b", "c/d")
    assert cfg.flex_kernel_options == {"fwd_num_warps": 8} and cfg.resume == ResumeFrom("folder", tmp_path)
    assert cfg.deepspeed == DEFAULT_DS_CONFIG and RunConfig.load(deepspeed="none").deepspeed is None
    assert RunConfig.load(report_to="none").report_to == ()
    written = cfg.to_dict()
    assert (written["data"], written["report_to"], written["deepspeed"], written["resume"]) == (
        "4:wiki=/data/wiki,1:replay=org/replay",
        "tensorboard,wandb",
        "default",
        str(tmp_path),
    )
    older = {**written, "dataset_ids": None}  # what a run folder of an earlier version holds
    (tmp_path / "run_config.json").write_text(json.dumps(older))
    assert RunConfig.load(str(tmp_path / "run_config.json")) == dataclasses.replace(cfg, dataset_ids=())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tensorboard,none", "--report-to 'tensorboard,none' names none beside integrations"),
        ("tensorboard,,wandb", "--report-to 'tensorboard,,wandb' has an empty item"),
    ],
)
def test_report_to_with_none_beside_an_integration_is_refused_before_anything_is_written(tmp_path, value, message):
    output = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "job", "train", "--report-to", value, "--output-dir", str(output)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message} -- "), proc.stderr
    assert not output.exists()
