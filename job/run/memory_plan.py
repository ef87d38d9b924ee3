"""The memory plan: what one training process holds on its GPU (and what offload needs in CPU memory), from the model's
shape, the run's settings and the target machine, before anything is loaded. Pure functions over typed values: no
torch, no devices; `machine_here` is the one place that asks this machine.

Model states (bytes per parameter P, N data-parallel processes, L the largest module's parameters, w the training
dtype's bytes: 2 in bf16, 4 in fp32) follow DeepSpeed's own accounting (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`; tests/test_memory_plan.py holds the two within 5%):

| ZeRO | parameters | gradients | optimizer states (fp32 master, Adam m and v) |
| --- | --- | --- | --- |
| none (DDP) | 4P | 4P + 4P (DDP's buckets) | 8P |
| 0 | wP | wP + 4P (fp32) | 12P |
| 1 | wP | wP + 4P/N | 12P/N |
| 2 | wP | (w + 4)P/N | 12P/N |
| 3 | wP/N + wL (one module gathered) | 4P/N + wL | 12P/N |

Offload moves the optimizer states and fp32 gradients (optimizer) and at ZeRO-3 the parameters too (all) to CPU
memory, which then needs DeepSpeed's figures times its 1.5 buffer factor.

Activations (what the backward keeps; measured on CPU through torch's MemTracker over fake tensors, the real model
step with the job's patches, tests/test_memory_plan.py): per block 16 tensors of [micro-batch, tokens, hidden] in the
compute dtype, or with checkpointing one (the block's input) plus one block's 16 during its recompute; eager
attention adds its fp32 [batch, heads, tokens, tokens] probabilities per block (and their bf16 copy); sdpa one
additive bias of that shape per step (flex none). The chunked loss holds three fp32 [chunk, vocab] tensors at a time
(temporary). Gradients count whole throughout: with gradient accumulation they live through every later micro-step's
forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

GiB = 2**30
Stage = Literal[0, 1, 2, 3]
OffloadKind = Literal["none", "optimizer", "all"]
OffloadDevice = Literal["cpu", "nvme"]
AttentionKind = Literal["eager", "sdpa", "flex"]

BLOCK_TENSORS = 16  # [b, s, h] tensors a Bloom block keeps for its backward (measured, see the module docstring)
OUTSIDE_BLOCKS = 3  # embeddings, their LayerNorm, the final LayerNorm: [b, s, h] each
LOSS_CHUNK_TENSORS = 3  # fp32 [chunk, vocab]: the logits, their log-softmax, its gradient
BUFFER_FACTOR = 1.5  # DeepSpeed's estimators' margin on CPU memory (pinned buffers, the load)
# What a GPU holds besides the plan's tensors: the CUDA context, cuBLAS/NCCL workspaces, the caching allocator's
# fragmentation. A margin, not a measurement: `make bench-gpu` compares plan and measured peak.
GPU_RESERVE = int(2.5 * GiB)
CPU_RESERVE = 8 * GiB  # the OS, the DataLoader workers, the page cache a node keeps for itself


@dataclass(frozen=True)
class ModelShape:
    """A Bloom's shape: what its memory depends on."""

    hidden: int
    layers: int
    heads: int
    vocab: int
    tied: bool = True

    @classmethod
    def from_config(cls, config) -> ModelShape:
        return cls(
            hidden=config.hidden_size,
            layers=config.n_layer,
            heads=config.n_head,
            vocab=config.vocab_size,
            tied=getattr(config, "tie_word_embeddings", True),
        )

    @property
    def parameters(self) -> int:
        h = self.hidden
        head = 0 if self.tied else self.vocab * h
        return self.vocab * h + head + self.layers * (12 * h * h + 13 * h) + 4 * h

    @property
    def largest_module(self) -> int:
        """The parameters of the largest single module (the embedding, or the MLP's 4h x h), as ZeRO-3 gathers them."""
        return max(self.vocab * self.hidden, 4 * self.hidden * self.hidden + 4 * self.hidden)


@dataclass(frozen=True)
class RunSettings:
    """The run's settings that move memory. `zero_stage` None: no DeepSpeed (DDP)."""

    zero_stage: Stage | None
    offload: OffloadKind
    micro_batch: int
    seq_len: int
    grad_accum: int
    checkpointing: bool
    attention: AttentionKind
    bf16: bool
    loss_chunk_tokens: int = 2048  # job.model.loss.CHUNK_TOKENS
    bucket_elements: int = 400_000_000  # ZeRO 1/2: reduce + allgather buckets; ZeRO-3: prefetch + reduce
    offload_to: OffloadDevice = "cpu"  # where offloaded states go: CPU memory, or NVMe (ZeRO-3 only)


@dataclass(frozen=True)
class Machine:
    """Where it runs: `gpu_memory` per device, `cpu_memory` per node (bytes)."""

    gpus_per_node: int
    nodes: int
    gpu_memory: int
    cpu_memory: int
    device: Literal["cuda", "cpu"] = "cuda"

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def unit(self) -> str:
        """What one share of `gpu_memory` is: a GPU, or on a CPU one process's part of the RAM."""
        return "GPU" if self.device == "cuda" else "process"


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    settings: RunSettings
    machine: Machine
    parameters: int  # bytes per GPU
    gradients: int
    optimizer: int
    activations: int
    buffers: int  # temporary: the loss chunks, the attention bias, DeepSpeed's buckets, the GPU reserve
    cpu_need: int  # bytes per node

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.buffers

    @property
    def fits_gpu(self) -> bool:
        return self.total <= self.machine.gpu_memory

    @property
    def fits_cpu(self) -> bool:
        return self.cpu_need <= self.machine.cpu_memory

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_cpu

    def lines(self) -> list[str]:
        s, m = self.settings, self.machine
        zero = "DDP (no DeepSpeed)" if s.zero_stage is None else f"ZeRO-{s.zero_stage}, offload {s.offload}"
        rows = [
            (
                f"{self.shape.parameters / 1e6:,.1f}M parameters on {m.nodes} node(s) x {m.gpus_per_node} "
                f"x {gib(m.gpu_memory)}; {zero}; micro-batch {s.micro_batch} x {s.seq_len} tokens x accumulation "
                f"{s.grad_accum}; {s.attention}; checkpointing {'on' if s.checkpointing else 'off'}; "
                f"{'bf16' if s.bf16 else 'fp32'}"
            ),
            f"  parameters   {gib(self.parameters):>10} per {m.unit}",
            f"  gradients    {gib(self.gradients):>10}",
            f"  optimizer    {gib(self.optimizer):>10}",
            f"  activations  {gib(self.activations):>10}",
            f"  buffers      {gib(self.buffers):>10}  (loss chunks, attention bias, ZeRO buckets, reserve)",
            f"  total        {gib(self.total):>10} of {gib(m.gpu_memory)}: "
            f"{'fits' if self.fits_gpu else 'DOES NOT FIT'}",
            f"  CPU memory   {gib(self.cpu_need):>10} per node of {gib(m.cpu_memory)}: "
            f"{'fits' if self.fits_cpu else 'DOES NOT FIT'}",
        ]
        return rows

    def summary(self) -> str:
        """The plan in one line (doctor's and train's `memory` row)."""
        return (
            f"{gib(self.total)} per {self.machine.unit} of {gib(self.machine.gpu_memory)} (parameters "
            f"{gib(self.parameters)}, gradients {gib(self.gradients)}, optimizer {gib(self.optimizer)}, activations "
            f"{gib(self.activations)}, buffers {gib(self.buffers)}); CPU {gib(self.cpu_need)} of "
            f"{gib(self.machine.cpu_memory)}"
        )


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


# ------------------------------------------------------------------------------------------------ the figures
def model_states(shape: ModelShape, s: RunSettings, m: Machine) -> tuple[int, int, int, int]:
    """(parameters, gradients, optimizer states) per GPU and the CPU memory per node, in bytes (module docstring)."""
    p, n, big = shape.parameters, m.world, shape.largest_module
    w = 2 if s.bf16 else 4
    per_node = m.gpus_per_node
    if s.zero_stage is None:  # torch AdamW over fp32 weights (bf16 by autocast); each process loads the model once
        return 4 * p, 8 * p if n > 1 else 4 * p, 8 * p, int(4 * p * per_node * BUFFER_FACTOR)
    if s.zero_stage == 3:
        params, grads, optim = w * p // n + w * big, 4 * p // n + w * big, 12 * p // n
        cpu = int(4 * big * per_node * BUFFER_FACTOR)  # zero.Init: a process never holds more than one module whole
    else:
        params = w * p
        grads = {0: w * p + 4 * p, 1: w * p + 4 * p // n, 2: (w + 4) * p // n}[s.zero_stage]
        optim = 12 * p // n if s.zero_stage else 12 * p
        cpu = int(4 * p * per_node * BUFFER_FACTOR)  # each process builds the whole fp32 model before sharding
    if s.offload == "none":
        return params, grads, optim, cpu
    fp32_grads = 4 * p // n
    if s.zero_stage == 3:
        offloaded = 16 * p if s.offload == "optimizer" else 18 * p  # all: the 16-bit parameters too
        if s.offload_to == "cpu":  # on NVMe they take disk, not memory: the CPU keeps zero.Init's need
            cpu = int(offloaded / m.nodes * BUFFER_FACTOR)
        params = w * big if s.offload == "all" else params
        return params, w * big, 0, cpu
    cpu = int(p * max(4 * per_node, 16 / m.nodes) * BUFFER_FACTOR)
    on_gpu = grads - fp32_grads - (w * p // n if s.zero_stage == 2 else 0)  # ZeRO-2 reduces into CPU buffers
    return params, on_gpu, 0, cpu


def activation_bytes(shape: ModelShape, s: RunSettings) -> tuple[int, int]:
    """(activations the backward keeps, temporary buffers of the step) per GPU, in bytes (module docstring).

    Without checkpointing the peak is the end of the forward: every block's tensors and the loss chunks at once.
    With it the blocks keep their inputs only, and the peak is the larger of the loss chunks and one block's
    recompute."""
    e = 2 if s.bf16 and s.zero_stage is not None else 4  # DeepSpeed's bf16 is a bf16 model; DDP's an fp32 one
    bsh = s.micro_batch * s.seq_len * shape.hidden
    scores = s.micro_batch * shape.heads * s.seq_len * s.seq_len
    # eager keeps its fp32 softmax (and in bf16 the bf16 copy the next matmul reads); its backward holds 14 bytes a
    # score at once (scores, softmax and their gradients, some freed early; measured)
    eager = s.attention == "eager"
    block = e * BLOCK_TENSORS * bsh + ((4 + (e if e < 4 else 0)) * scores if eager else 0)
    chunk = min(s.loss_chunk_tokens, s.micro_batch * s.seq_len)
    loss = LOSS_CHUNK_TENSORS * chunk * shape.vocab * 4
    if s.checkpointing:
        recompute = e * BLOCK_TENSORS * bsh + (14 * scores if eager else 0)
        activations, transient = e * (shape.layers + OUTSIDE_BLOCKS) * bsh, max(loss, recompute)
    else:
        activations, transient = shape.layers * block + e * OUTSIDE_BLOCKS * bsh, loss
    if s.attention == "sdpa":  # one additive ALiBi + mask bias per step, shared by the blocks
        activations += e * scores
    if eager:  # the stock forward's causal mask and ALiBi, one each per step
        activations += s.micro_batch * s.seq_len * s.seq_len + 4 * s.micro_batch * shape.heads * s.seq_len
    if s.zero_stage:
        transient += e * s.bucket_elements
    return activations, transient


def plan(shape: ModelShape, s: RunSettings, m: Machine) -> Plan:
    params, grads, optim, cpu = model_states(shape, s, m)
    activations, buffers = activation_bytes(shape, s)
    reserve = GPU_RESERVE if m.device == "cuda" else 0
    return Plan(shape, s, m, params, grads, optim, activations, buffers + reserve, cpu + CPU_RESERVE)


# ------------------------------------------------------------------------------------------------ choosing
def candidates(s: RunSettings, m: Machine) -> list[RunSettings]:
    """Every setting that keeps the global batch, fastest first: no offload before offload, the lowest ZeRO stage,
    no checkpointing before checkpointing, the largest micro-batch (the rest by gradient accumulation)."""
    rows = s.micro_batch * s.grad_accum  # per process per optimizer step: what the global batch keeps
    micros = [b for b in range(rows, 0, -1) if rows % b == 0]
    if s.zero_stage is None:  # DDP: the run asked for no DeepSpeed; only the batch split and checkpointing move
        levels: list[tuple[Stage | None, OffloadKind]] = [(None, "none")]
    else:
        first: Stage = 1 if m.world > 1 else 0  # ZeRO-1 shards the optimizer for free across processes
        levels = [(z, "none") for z in range(first, 4)]
        levels += [(z, "optimizer") for z in (2, 3)] + [(3, "all")]
    return [
        dataclasses.replace(
            s,
            zero_stage=z,
            offload=o,
            offload_to=s.offload_to if z == 3 else "cpu",  # NVMe is ZeRO-3's alone
            checkpointing=c,
            micro_batch=b,
            grad_accum=rows // b,
        )
        for z, o in levels
        for c in (False, True)
        for b in micros
    ]


def choose(shape: ModelShape, s: RunSettings, m: Machine) -> Plan | None:
    """The fastest plan that fits (`candidates` order), None if none does."""
    return next((p for c in candidates(s, m) if (p := plan(shape, c, m)).fits), None)


def settings_flags(s: RunSettings) -> str:
    """The flags that give `s`, for a one-line fix."""
    flags = [f"--per-device-batch-size {s.micro_batch}", f"--grad-accum {s.grad_accum}"]
    if s.zero_stage is not None:
        flags += [f"--zero-stage {s.zero_stage}", f"--offload {s.offload}"]
    if s.checkpointing:
        flags.append("--gradient-checkpointing")
    return " ".join(flags)


def why(chosen: RunSettings, asked: RunSettings) -> str:
    """What `--plan auto` changed, and why each (the order `candidates` tries them)."""
    reasons = []
    if (chosen.zero_stage, chosen.offload) != (asked.zero_stage, asked.offload):
        reasons.append(
            f"ZeRO-{chosen.zero_stage} offload {chosen.offload}: the lowest stage"
            + (" without offload" if chosen.offload == "none" else " (none without offload fits)")
        )
    if chosen.micro_batch != asked.micro_batch:
        reasons.append(
            f"micro-batch {chosen.micro_batch} x accumulation {chosen.grad_accum}: the largest that fits, "
            f"the same {chosen.micro_batch * chosen.grad_accum} rows per process per step"
        )
    if chosen.checkpointing != asked.checkpointing:
        reasons.append(
            "gradient checkpointing " + ("on: nothing fits without it" if chosen.checkpointing else "off: not needed")
        )
    return "; ".join(reasons) or "the run's own settings fit"


# ------------------------------------------------------------------------------------------------ from a run config
def settings_of(cfg, attention: str) -> RunSettings:
    """The plan's settings of a run config trained with the `attention` kernel (the launch's): its DeepSpeed file
    rendered (stage, offload, bucket sizes)."""
    from job.model.loss import CHUNK_TOKENS
    from job.run.deepspeed_config import deepspeed_config, offload_device, offload_in_use

    ds = deepspeed_config(cfg)
    zero = (ds or {}).get("zero_optimization", {})
    stage = None if ds is None else zero.get("stage", 0)
    # DeepSpeed's defaults where the file sets none
    buckets = zero.get("reduce_bucket_size", 5e8) + (
        zero.get("stage3_prefetch_bucket_size", 5e7) if stage == 3 else zero.get("allgather_bucket_size", 5e8)
    )
    return RunSettings(
        zero_stage=stage,
        offload=offload_in_use(ds),
        offload_to=offload_device(ds),
        micro_batch=cfg.per_device_batch_size,
        seq_len=cfg.max_length,
        grad_accum=cfg.grad_accum,
        checkpointing=cfg.gradient_checkpointing,
        attention=attention,
        bf16=cfg.bf16,
        loss_chunk_tokens=CHUNK_TOKENS,
        bucket_elements=int(buckets),
    )


def with_settings(cfg, s: RunSettings):
    """`cfg` with the settings `--plan auto` chose."""
    stage = {"zero_stage": s.zero_stage, "offload": s.offload} if s.zero_stage is not None else {}
    nvme = cfg.offload_nvme if s.offload_to == "nvme" and s.offload != "none" else None
    return dataclasses.replace(
        cfg,
        per_device_batch_size=s.micro_batch,
        grad_accum=s.grad_accum,
        gradient_checkpointing=s.checkpointing,
        offload_nvme=nvme,
        **stage,
    )


def auto_conflict(chosen_cfg, settings: RunSettings, launch):
    """The refusal (a JobError) of the run config `--plan auto` made (`with_settings`) when it would not train with
    `settings` under `launch`: its DeepSpeed file pins a batch value, or sets offload sections of its own, that the
    rendering keeps. None: it would train as planned."""
    from job.core.errors import JobError
    from job.run.deepspeed_config import check_batch_arithmetic

    try:
        check_batch_arithmetic(chosen_cfg, launch)
    except JobError as e:
        problem = e.cause
    else:
        rendered = settings_of(chosen_cfg, launch.attention)
        fields = ("zero_stage", "offload", "offload_to", "micro_batch", "grad_accum", "checkpointing")
        differ = [f"{f} {getattr(rendered, f)}" for f in fields if getattr(rendered, f) != getattr(settings, f)]
        if not differ:
            return None
        problem = f"{chosen_cfg.deepspeed} makes it train with {', '.join(differ)}"
    return JobError(
        f"--plan auto chose {settings_flags(settings)}, but {problem}",
        'set those values to "auto" (or remove them) in the DeepSpeed file, or use --plan check',
    )


def machine_here(nproc_per_node: int, nnodes: int, device: str, gpus: int | None = None, nodes: int | None = None):
    """This machine as a launch of `nproc_per_node` processes on `nnodes` nodes on `device` uses it (or `gpus` x
    `nodes` of this machine's GPUs): every visible GPU's memory, else the CPU's RAM shared by the processes."""
    import psutil

    per_node = gpus or nproc_per_node
    ram = psutil.virtual_memory()
    if device == "cuda":
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory
        return Machine(per_node, nodes or nnodes, memory, ram.total, "cuda")
    return Machine(per_node, nodes or nnodes, ram.available // per_node, ram.available, "cpu")


def plan_run(cfg, model_config, machine: Machine, attention: str) -> tuple[Plan, Plan | None]:
    """The plan of the run as configured and, with `--plan auto` or when it does not fit, the fastest that fits."""
    shape = ModelShape.from_config(model_config)
    asked = settings_of(cfg, attention)
    mine = plan(shape, asked, machine)
    best = choose(shape, asked, machine) if cfg.plan == "auto" or not mine.fits else None
    return mine, best


def planned_memory(plan: Plan, chosen_by: str):
    """What the launch records of `plan` (`job.run.launch_record.PlannedMemory`)."""
    from job.run.launch_record import PlannedMemory

    s = plan.settings
    return PlannedMemory(
        zero_stage=s.zero_stage,
        offload=s.offload,
        gradient_checkpointing=s.checkpointing,
        per_device_batch_size=s.micro_batch,
        grad_accum=s.grad_accum,
        bytes_per_device=plan.total,
        device_memory=plan.machine.gpu_memory,
        chosen_by=chosen_by,
    )


def refusal(mine: Plan, best: Plan | None):
    """The one-line JobError of a plan that does not fit: what would."""
    from job.core.errors import JobError

    m = mine.machine
    short = (
        f"needs {gib(mine.total)} per {'GPU' if m.device == 'cuda' else 'process'}, {gib(m.gpu_memory)} there"
        if not mine.fits_gpu
        else f"needs {gib(mine.cpu_need)} of CPU memory per node, {gib(m.cpu_memory)} there"
    )
    cause = f"the memory plan does not fit: {short}"
    if best is None:
        return JobError(
            cause,
            "no stage, offload, micro-batch or checkpointing fits: lower --max-length, more GPUs or a smaller model",
        )
    return JobError(cause, f"use {settings_flags(best.settings)} (or --plan auto)")
