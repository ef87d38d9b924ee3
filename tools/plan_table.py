"""The memory plan of every Bloom-zh size on 8 x 80 GB, 1 x 80 GB and 1 x 141 GB, as BENCHMARKS.md's table (a test holds
the two equal): the run as asked (bf16, 2048-token rows, ZeRO-2, micro-batch 8 x accumulation 4, flex attention,
no checkpointing) and what `--plan auto` picks for it.

    python -m tools.plan_table
"""

from __future__ import annotations

from job.model.build import PRESET_SHAPES, preset_config
from job.run.memory_plan import GiB, Machine, ModelShape, RunSettings, choose, gib, plan, settings_flags

ASKED = RunSettings(
    zero_stage=2, offload="none", micro_batch=8, seq_len=2048, grad_accum=4, checkpointing=False, attention="flex",
    bf16=True, bucket_elements=400_000_000,  # ds_config.json's reduce + allgather buckets
)  # fmt: skip
MACHINES = [(8, 80, 1000), (1, 80, 240), (1, 141, 240)]  # GPUs, GiB each, CPU GiB per node


def rows() -> list[str]:
    lines = [
        "| model | GPUs | as asked | `--plan auto` picks | per GPU | CPU per node |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for preset in (p for p in PRESET_SHAPES if p != "tiny"):
        shape = ModelShape.from_config(preset_config(preset))
        for gpus, memory, cpu in MACHINES:
            machine = Machine(gpus, 1, memory * GiB, cpu * GiB)
            asked, best = plan(shape, ASKED, machine), choose(shape, ASKED, machine)
            fits = f"{gib(asked.total)}, {'fits' if asked.fits else 'does not fit'}"
            pick = (
                f"`{settings_flags(best.settings)}` | {gib(best.total)} | {gib(best.cpu_need)}" if best else "none | |"
            )
            lines.append(f"| {preset} | {gpus} x {memory} GB | {fits} | {pick} |")
    return lines


if __name__ == "__main__":
    print("\n".join(rows()))
