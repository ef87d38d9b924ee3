"""The memory plan's activations against a GPU's measured peak (`make bench-gpu` runs it; needs CUDA).

For each preset and checkpointing off/on: the model in bf16 on the GPU (as DeepSpeed's bf16 holds it) with the job's
CUDA patches (flex attention, the chunked loss), one micro-step to create the gradients, then the peak of a second
one (`torch.cuda.max_memory_allocated`) less what was allocated before it (parameters and gradients): the step's
activations and buffers, against the plan's (`activation_bytes`, ZeRO buckets left out). One JSON line per case;
exit 1 if any is off by more than 10%.
"""

from __future__ import annotations

import json
import sys

import click

TOLERANCE = 0.10


def measure(preset: str, micro_batch: int, seq_len: int, checkpointing: bool) -> dict:
    import torch
    from transformers import BloomForCausalLM

    from job.core.config import RunConfig
    from job.model.build import preset_config
    from job.model.patches import apply_patches, model_patches
    from job.run.memory_plan import ModelShape, RunSettings, activation_bytes

    config = preset_config(preset)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = BloomForCausalLM(config).to(torch.bfloat16).train()
    apply_patches(model, model_patches(RunConfig(preset=preset, liger_loss=False), "cuda"))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(4, config.vocab_size, (micro_batch, seq_len), device="cuda")
    model(ids, labels=ids).loss.backward()  # the first micro-step (and flex's compilation)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    settings = RunSettings(
        zero_stage=2, offload="none", micro_batch=micro_batch, seq_len=seq_len, grad_accum=2,
        checkpointing=checkpointing, attention="flex", bf16=True, bucket_elements=0,
    )  # fmt: skip
    planned = sum(activation_bytes(ModelShape.from_config(config), settings))
    del model
    torch.cuda.empty_cache()
    return {
        "step": "plan check",
        "preset": preset,
        "checkpointing": checkpointing,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "planned_gib": round(planned / 2**30, 3),
        "measured_gib": round(measured / 2**30, 3),
        "ratio": round(planned / measured, 3),
        "ok": abs(planned / measured - 1) <= TOLERANCE,
    }


@click.command()
@click.option("--preset", "presets", multiple=True, default=["bloom-389m-zh", "bloom-800m-zh"], show_default=True)
@click.option("--micro-batch", type=int, default=4, show_default=True)
@click.option("--seq-len", type=int, default=1024, show_default=True)
def main(presets, micro_batch, seq_len):
    """Plan vs measured activation peak, per preset, checkpointing off and on."""
    import torch

    if not torch.cuda.is_available():
        click.echo(json.dumps({"step": "plan check", "status": "skipped", "why": "no CUDA device"}))
        sys.exit(0)
    rows = [measure(p, micro_batch, seq_len, c) for p in presets for c in (False, True)]
    for row in rows:
        click.echo(json.dumps(row))
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
