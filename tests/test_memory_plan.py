"""The memory plan: model states against DeepSpeed's own estimators, activations against a measurement of the real
model step (torch's MemTracker over fake tensors: nothing allocated), the `plan` command and `train`'s refusal."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re

import pytest
import torch
from click.testing import CliRunner

from job.cli import cli
from job.core.config import RunConfig
from job.model.build import PRESET_SHAPES, preset_config
from job.run.memory_plan import (
    GiB,
    Machine,
    ModelShape,
    RunSettings,
    activation_bytes,
    candidates,
    choose,
    model_states,
    plan,
    settings_of,
    with_settings,
)

ZH = [name for name in PRESET_SHAPES if name != "tiny"]
BF16_ZERO2 = RunSettings(
    zero_stage=2, offload="none", micro_batch=1, seq_len=2048, grad_accum=1, checkpointing=True, attention="flex",
    bf16=True,
)  # fmt: skip


def shape_of(preset: str) -> ModelShape:
    return ModelShape.from_config(preset_config(preset))


def test_shape_counts_the_presets_parameters():
    from job.core.units import config_parameter_count

    for name in PRESET_SHAPES:
        assert shape_of(name).parameters == config_parameter_count(preset_config(name, 8000))


@pytest.mark.parametrize("preset", ZH)
@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 1), (8, 2)])
def test_model_states_agree_with_deepspeeds_estimators(preset, gpus, nodes):
    """Per GPU within 5% of DeepSpeed's figures for every stage/offload its estimators cover; CPU memory on one node
    (across nodes DeepSpeed's ZeRO-2 figure counts every GPU of the job against each node)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape, machine = shape_of(preset), Machine(gpus, nodes, 80 * GiB, 1000 * GiB)
    cases = {
        (2, "none"): estimate_zero2_model_states_mem_needs(shape.parameters, gpus, nodes, cpu_offload=False),
        (2, "optimizer"): estimate_zero2_model_states_mem_needs(shape.parameters, gpus, nodes, cpu_offload=True),
    }
    for offload, (cpu_optimizer, cpu_params) in {"none": (False, False), "optimizer": (True, False)}.items():
        cases[(3, offload)] = estimate_zero3_model_states_mem_needs(
            shape.parameters,
            shape.largest_module,
            gpus,
            nodes,
            cpu_offload=cpu_optimizer,
            cpu_offload_params=cpu_params,
        )[:2]
    cases[(3, "all")] = estimate_zero3_model_states_mem_needs(shape.parameters, shape.largest_module, gpus, nodes)[:2]
    for (stage, offload), (ds_cpu, ds_gpu) in cases.items():
        params, grads, optim, cpu = model_states(
            shape, dataclasses.replace(BF16_ZERO2, zero_stage=stage, offload=offload), machine
        )
        assert params + grads + optim == pytest.approx(ds_gpu, rel=0.05), (stage, offload)
        if nodes == 1:
            assert cpu == pytest.approx(ds_cpu, rel=0.05), (stage, offload)


def test_the_estimators_tables_print_what_the_plan_says():
    """`estimate_zero3_model_states_mem_needs_all_cold`'s own table (GB there are GiB), for 6b4 on 8 GPUs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    shape, machine = shape_of("bloom-6b4-zh"), Machine(8, 1, 80 * GiB, 1000 * GiB)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate_zero3_model_states_mem_needs_all_cold(shape.parameters, shape.largest_module, 8, 1)
    table = {m[3]: float(m[2]) for m in re.finditer(r"([\d.]+)GB \|\s+([\d.]+)GB \| (.*)", out.getvalue())}
    row = "offload_param=none, offload_optimizer=none, zero_init=1"
    params, grads, optim, _ = model_states(shape, dataclasses.replace(BF16_ZERO2, zero_stage=3), machine)
    assert (params + grads + optim) / GiB == pytest.approx(table[row], rel=0.05), out.getvalue()


def _measured_peak(shape: ModelShape, s: RunSettings) -> int:
    """Peak bytes of the second micro-step of an accumulation (gradients already there), the job's patched model
    in fake tensors: torch's MemTracker accounts every tensor without allocating any."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import BloomConfig, BloomForCausalLM

    from job.model.patches import apply_patches, model_patches

    dtype = torch.bfloat16 if s.bf16 else torch.float32
    config = BloomConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, n_layer=shape.layers, n_head=shape.heads, eos_token_id=2
    )
    default = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(dtype)  # DeepSpeed's bf16: the model itself in bf16
        try:
            model = BloomForCausalLM(config).train()
        finally:
            torch.set_default_dtype(default)
        apply_patches(model, model_patches(RunConfig(attention=s.attention, liger_loss=False), "cpu"))
        if s.checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(4, shape.vocab, (s.micro_batch, s.seq_len))
        model(ids, labels=ids).loss.backward()
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            model(ids, labels=ids).loss.backward()
        return sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_activations_agree_with_a_measured_step(attention, checkpointing, bf16):
    """Parameters + gradients (both whole, in the model's dtype) + the plan's activations and buffers against the
    measured peak: within 2% for sdpa (the job's CPU path); eager's stock tensors within 5% and never below."""
    shape = ModelShape(hidden=256, layers=6, heads=8, vocab=4000)
    s = RunSettings(
        zero_stage=2 if bf16 else None, offload="none", micro_batch=2, seq_len=384, grad_accum=2,
        checkpointing=checkpointing, attention=attention, bf16=bf16, bucket_elements=0,
    )  # fmt: skip
    activations, buffers = activation_bytes(shape, s)
    states = 2 * shape.parameters * (2 if bf16 else 4)
    planned, measured = states + activations + buffers, _measured_peak(shape, s)
    if attention == "sdpa":
        assert planned == pytest.approx(measured, rel=0.02)
    else:
        assert measured <= planned <= 1.05 * measured


def test_auto_keeps_the_global_batch_and_prefers_no_offload_then_the_lowest_stage():
    shape = shape_of("bloom-6b4-zh")
    asked = dataclasses.replace(BF16_ZERO2, micro_batch=8, grad_accum=2, checkpointing=False)
    one_80 = Machine(1, 1, 80 * GiB, 512 * GiB)
    order = candidates(asked, one_80)
    assert all(c.micro_batch * c.grad_accum == 16 for c in order)
    assert [(c.zero_stage, c.offload) for c in order][:: 2 * 5][:4] == [
        (0, "none"),
        (1, "none"),
        (2, "none"),
        (3, "none"),
    ]
    best = choose(shape, asked, one_80)
    assert best is not None and best.settings.offload != "none"  # 6b4's 93 GiB of states exceed one 80 GB GPU
    eight = choose(shape, asked, Machine(8, 1, 80 * GiB, 1000 * GiB))
    assert eight is not None and eight.settings.offload == "none" and eight.fits
    assert not plan(shape, dataclasses.replace(asked, zero_stage=0), one_80).fits


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_plan_command_exits_0_when_it_fits_and_2_naming_what_would():
    fits = run_cli(
        "plan", "--preset", "bloom-389m-zh", "--bf16", "--gpus", "1", "--gpu-memory", "80", "--cpu-memory", "64"
    )
    assert fits.exit_code == 0, fits.output
    assert re.search(r"total\s+[\d.]+ GiB of 80.0 GiB: fits", fits.output), fits.output
    big = ["plan", "--preset", "bloom-6b4-zh", "--bf16", "--max-length", "2048", "--per-device-batch-size", "4"]
    refused = run_cli(*big, "--gpus", "1", "--gpu-memory", "80", "--cpu-memory", "512")
    assert refused.exit_code == 2, refused.output
    error = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "does not fit" in error[0] and "--offload" in error[0], refused.output
    auto = run_cli(*big, "--gpus", "1", "--gpu-memory", "80", "--cpu-memory", "512", "--plan", "auto")
    assert auto.exit_code == 0 and "--plan auto: " in auto.output, auto.output
    nothing = run_cli(*big, "--gpus", "1", "--gpu-memory", "8", "--cpu-memory", "16")
    assert nothing.exit_code == 2 and "no stage, offload" in nothing.output, nothing.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has GPUs whose memory the plan reads")
def test_gpus_named_on_a_machine_without_any_need_their_memory():
    result = run_cli("plan", "--preset", "bloom-389m-zh", "--gpus", "8")
    assert result.exit_code == 2 and "add --gpu-memory GiB" in result.output, result.output
    assert "GiB per GPU" not in result.output  # no plan against a GPU size made up from this machine's RAM


def test_settings_of_reads_the_rendered_deepspeed_file():
    s = settings_of(RunConfig.load(zero_stage=3, offload="all", gradient_checkpointing=True), "flex")
    assert (s.zero_stage, s.offload, s.checkpointing, s.attention) == (3, "all", True, "flex")
    assert settings_of(RunConfig.load(deepspeed="none"), "sdpa").zero_stage is None
    chosen = dataclasses.replace(s, zero_stage=2, offload="optimizer", micro_batch=4, grad_accum=4, checkpointing=False)
    cfg = with_settings(RunConfig.load(zero_stage=3, offload="all", gradient_checkpointing=True), chosen)
    assert (cfg.zero_stage, cfg.offload, cfg.per_device_batch_size, cfg.grad_accum) == (2, "optimizer", 4, 4)
    assert not cfg.gradient_checkpointing


def test_states_offloaded_to_nvme_take_no_cpu_memory_and_auto_keeps_nvme_to_zero3(tmp_path):
    shape = shape_of("bloom-6b4-zh")
    to_cpu = dataclasses.replace(BF16_ZERO2, zero_stage=3, offload="all")
    one_80 = Machine(1, 1, 80 * GiB, 64 * GiB)
    in_memory, on_disk = (
        plan(shape, to_cpu, one_80),
        plan(shape, dataclasses.replace(to_cpu, offload_to="nvme"), one_80),
    )
    assert in_memory.cpu_need > 18 * shape.parameters and not in_memory.fits  # 6b4's states: 104 GiB in 64 GiB
    assert on_disk.cpu_need < 24 * GiB and on_disk.fits and on_disk.total == in_memory.total  # the GPU side alike
    nvme = str(tmp_path / "nvme")
    cfg = RunConfig.load(zero_stage=3, offload="all", offload_nvme=nvme)
    assert settings_of(cfg, "sdpa").offload_to == "nvme"
    assert {c.offload_to for c in candidates(settings_of(cfg, "sdpa"), one_80) if c.zero_stage != 3} == {"cpu"}
    zero2 = dataclasses.replace(settings_of(cfg, "sdpa"), zero_stage=2, offload="optimizer", offload_to="cpu")
    assert with_settings(cfg, zero2).offload_nvme is None  # ZeRO-2 offloads to CPU memory: a config it can render
    assert with_settings(cfg, settings_of(cfg, "sdpa")).offload_nvme == nvme


def test_auto_refuses_a_choice_the_deepspeed_file_would_override(tmp_path):
    """A file that pins the micro-batch (or offloads itself) would train with other settings than the plan chose."""
    pinned = tmp_path / "ds.json"
    pinned.write_text('{"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}')
    big = ["plan", "--preset", "bloom-6b4-zh", "--bf16", "--max-length", "2048", "--per-device-batch-size", "16"]
    machine = ["--gpus", "8", "--gpu-memory", "80", "--cpu-memory", "512", "--plan", "auto"]
    result = run_cli(*big, "--deepspeed", str(pinned), *machine)
    assert result.exit_code == 2, result.output  # 16 rows of 2048 tokens do not fit: auto takes fewer per step
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--plan auto chose" in error[0] and "train_micro_batch_size_per_gpu=16" in error[0]
    pinned.write_text('{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}')
    assert run_cli(*big, "--deepspeed", str(pinned), *machine).exit_code == 0


@pytest.mark.slow  # reads the built-in corpus before the memory check
def test_train_refuses_a_run_that_does_not_fit_before_any_process_starts(tmp_path, tiny_tokenizer_dir):
    """6b4 in fp32 on this machine's CPU memory: exit 2, one line with the settings that would fit (or none),
    nothing written."""
    out = tmp_path / "out"
    result = run_cli(
        "train", "--preset", "bloom-6b4-zh", "--tokenizer", str(tiny_tokenizer_dir), "--output-dir", str(out),
        "--max-steps", "1", "--deepspeed", "none",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "the memory plan does not fit" in result.output, result.output
    assert not out.exists()


def test_benchmarks_holds_the_plan_table_of_every_size():
    from pathlib import Path

    from tools.plan_table import rows

    text = (Path(__file__).resolve().parent.parent / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "\n".join(rows()) in text
