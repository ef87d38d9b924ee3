"""The launch, resolved once: what the launcher decides from the config and the machine before any worker starts.

Processes per node, nodes, this node's rank, world size, the device the workers train on, the attention kind, the
global batch, and which checkpoint (if any) is loaded as DeepSpeed's universal checkpoint. The preflight checks
resolve it (`resolve_launch`); the launcher records it with the run (`OUTPUT/launch.json`, node 0's view) and hands
it to its workers (`LAUNCH_ENV`, this node's view); the workers, the resume rules, the DeepSpeed config, the model
card and bench read it and derive none of it again. The memory check (`job.run.memory_plan`) adds the memory plan
it settled on: the ZeRO stage, offload, checkpointing and micro-batch the run trains with, and the figure it fits in.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from job.core import checkpoints, run_files
from job.core.config import RunConfig
from job.core.errors import JobError
from job.core.files import atomic_write_json
from job.core.topology import device_type, processes_per_node

LAUNCH_ENV = "JOB_LAUNCH"  # the record as JSON, in every worker's environment (its node's rank)


@dataclass(frozen=True)
class PlannedMemory:
    """The settings the memory plan settled on (as configured, or chosen by `--plan auto`) and what they need."""

    zero_stage: int | None  # None: plain DDP
    offload: str
    gradient_checkpointing: bool
    per_device_batch_size: int
    grad_accum: int
    bytes_per_device: int  # the plan's total per GPU (per process on a CPU)
    device_memory: int  # what each GPU (process) has
    chosen_by: str  # "the run's settings" or "--plan auto"


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    world_size: int  # processes on all nodes: the data-parallel world
    device: str  # "cuda" or "cpu": where the workers train
    attention: str  # the kernel the model's attention patch installs: eager, sdpa or flex
    global_batch: int  # rows per optimizer step: per device x accumulation x world size
    universal_checkpoint: str | None = None  # the checkpoint loaded through its universal form (another world size)
    given_prepared: bool = False  # the run was given --prepared (not data the launcher prepared)
    memory: PlannedMemory | None = None  # None: not planned (--plan off, or no model config to plan from)

    def loads_universal(self, checkpoint: Path | None) -> bool:
        """Whether resuming from `checkpoint` loads its universal form (a restart after a newer save does not)."""
        return checkpoint is not None and str(checkpoint) == self.universal_checkpoint

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict) -> Launch:
        memory = values.get("memory")
        return cls(**{**values, "memory": PlannedMemory(**memory) if memory else None})


def resolve_launch(cfg: RunConfig) -> Launch:
    """The launch of `cfg`, whose launch settings are resolved (`job.core.topology.resolve_topology`)."""
    from job.model.attention import resolve_attention

    device = device_type(cfg)
    attention = resolve_attention(cfg.attention, device)  # flex where it cannot train: refused here
    return launch_on(cfg, processes_per_node(cfg), cfg.nnodes, device, attention, cfg.node_rank)


def launch_on(
    cfg: RunConfig, nproc_per_node: int, nnodes: int, device: str, attention: str, node_rank: int = 0
) -> Launch:
    """The launch of `cfg` as `nnodes` nodes of `nproc_per_node` processes on `device` would run it (this machine's,
    from `resolve_launch`, or another's: `python -m job plan --gpus N --nodes M`)."""
    world = nproc_per_node * nnodes
    return Launch(
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        node_rank=node_rank,
        world_size=world,
        device=device,
        attention=attention,
        global_batch=cfg.per_device_batch_size * cfg.grad_accum * world,
        given_prepared=cfg.prepared is not None,
    )


def with_resume_point(launch: Launch, last: Path | None) -> Launch:
    """`launch` with the universal-checkpoint decision for resuming from `last`: a ZeRO checkpoint written by
    another world size loads through its universal form."""
    universal = last is not None and checkpoints.zero_world_size(last) not in (None, launch.world_size)
    return dataclasses.replace(launch, universal_checkpoint=str(last) if universal else None)


def write_launch(output: Path, launch: Launch) -> None:
    atomic_write_json(output / run_files.LAUNCH, dataclasses.asdict(launch))


def read_launch(output: Path | None = None) -> Launch:
    """This worker's launch: from its environment (set by its launcher), else the run folder's record."""
    text = os.environ.get(LAUNCH_ENV)
    if text:
        return Launch.from_dict(json.loads(text))
    path = Path(output or ".") / run_files.LAUNCH
    try:
        return Launch.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise JobError(
            f"{path} is missing or unreadable ({type(e).__name__}): the launch of this run is not known",
            "start the run with `python -m job train`, which resolves and records it",
        ) from None
