"""The model's fast paths as an ordered list of named patches, each with `install`, `undo` and a description.

torchtitan's model converters are the anchor: `model_patches(cfg, device_type)` turns the run config into the list,
`apply_patches(model, patches)` installs them where the trainer is built and logs each one, or why it was not
installed and which stock path runs instead. A patch that re-implements transformers internals names the
transformers versions it was written for and refuses any other (the stock code then runs: slower, never wrong).

None of them changes the config, the class or the weights: `save_pretrained` writes a plain HF Bloom folder that
stock transformers loads, and `print(model)` lists what is installed. Each is exact (tests/test_model.py,
tests/test_attention.py).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from importlib.metadata import version
from types import MethodType
from typing import ClassVar

import torch.nn.functional as F
from packaging.specifiers import SpecifierSet

from job.model.attention import FlexSettings, install_attention, resolve_attention
from job.model.loss import CHUNK_TOKENS, install_chunked_loss, uninstall_chunked_loss

log = logging.getLogger("job")

# BloomModel.forward, BloomAttention.forward and BloomForCausalLM.forward as of these releases are what the
# attention and loss patches re-implement; another release may have changed what they replace.
BLOOM_INTERNALS = SpecifierSet(">=5.24,<5.25")


def _is_bloom(model) -> bool:
    from transformers import BloomForCausalLM

    return isinstance(model, BloomForCausalLM)


@dataclass
class ModelPatch:
    """One fast path. Subclasses set `name`, `stock` (what runs without it) and `written_for`."""

    name: ClassVar[str] = ""
    stock: ClassVar[str] = ""
    written_for: ClassVar[SpecifierSet | None] = None  # transformers releases whose internals it replaces (None: any)

    def not_applicable(self, model) -> str | None:
        """Why this patch cannot go on `model` (None: it can)."""
        if not _is_bloom(model):
            return f"{type(model).__name__} is not an HF Bloom"
        installed = version("transformers")
        if self.written_for is not None and installed not in self.written_for:
            return f"written for transformers {self.written_for}, this is {installed}"
        return None

    def install(self, model) -> str:
        """Patch `model` in place; returns what was installed, in words."""
        raise NotImplementedError

    def undo(self, model) -> None:
        raise NotImplementedError

    def details(self) -> str | None:
        """Settings worth a line of their own in the log and `print(model)` (None: nothing beyond the name)."""
        return None


@dataclass
class AttentionPatch(ModelPatch):
    kind: str = "sdpa"  # eager, sdpa or flex (auto resolved by `model_patches`)
    flex: FlexSettings = field(default_factory=FlexSettings)
    name: ClassVar[str] = "attention"
    stock: ClassVar[str] = "transformers' eager attention"
    written_for: ClassVar[SpecifierSet | None] = BLOOM_INTERNALS

    def install(self, model) -> str:
        install_attention(model, self.kind, self.flex)
        return self.kind

    def details(self) -> str | None:
        if self.kind != "flex":
            return None
        flex = self.flex
        return f"mode={flex.compile_mode}, padding {'folded into documents' if flex.fold_padding else 'as a mask'}" + (
            f", kernel_options={flex.kernel_options}" if flex.kernel_options else ""
        )

    def undo(self, model) -> None:
        install_attention(model, "eager")


def _fused_gelu_forward(self, x):
    return F.gelu(x, approximate="tanh")  # BloomGelu's tanh formula, one kernel forward and one backward


@dataclass
class FusedGeluPatch(ModelPatch):
    """Every `BloomGelu` computes through `F.gelu(approximate="tanh")` (the same function, ~27 fewer kernels)."""

    name: ClassVar[str] = "gelu"
    stock: ClassVar[str] = "BloomGelu's own tanh formula"

    def not_applicable(self, model) -> str | None:
        return None  # any module tree: it touches BloomGelu modules only, whose formula F.gelu(tanh) is

    def install(self, model) -> str:
        from transformers.models.bloom.modeling_bloom import BloomGelu

        modules = [m for m in model.modules() if isinstance(m, BloomGelu)]
        for module in modules:
            module.forward = MethodType(_fused_gelu_forward, module)
        return f"F.gelu(tanh) in {len(modules)} MLPs"

    def undo(self, model) -> None:
        from transformers.models.bloom.modeling_bloom import BloomGelu

        for module in model.modules():
            if isinstance(module, BloomGelu):
                module.__dict__.pop("forward", None)


@dataclass
class LossPatch(ModelPatch):
    liger: bool = False  # liger-kernel's fused linear + cross-entropy, else the chunked loss
    chunk_tokens: int = CHUNK_TOKENS
    name: ClassVar[str] = "loss"
    stock: ClassVar[str] = "transformers' full-logits loss"
    written_for: ClassVar[SpecifierSet | None] = BLOOM_INTERNALS

    def install(self, model) -> str:
        install_chunked_loss(model, self.chunk_tokens, loss="liger" if self.liger else "chunked")
        return "liger fused linear+cross-entropy" if self.liger else f"chunked ({self.chunk_tokens} tokens)"

    def undo(self, model) -> None:
        uninstall_chunked_loss(model)


@dataclass
class CompileBlocksPatch(ModelPatch):
    """`torch.compile` of each BloomBlock in place (regional compilation): state-dict keys stay stock."""

    name: ClassVar[str] = "compile"
    stock: ClassVar[str] = "uncompiled blocks"

    def install(self, model) -> str:
        for block in model.transformer.h:
            block.compile(dynamic=False)
        return f"each of {len(model.transformer.h)} BloomBlocks (dynamic=False)"

    def undo(self, model) -> None:
        for block in model.transformer.h:
            block._compiled_call_impl = None  # what `Module.compile` set


def liger_available(device_type: str) -> bool:
    """liger-kernel's Triton kernels run on CUDA only, and only where it and Triton are installed."""
    return device_type == "cuda" and all(importlib.util.find_spec(m) for m in ("liger_kernel", "triton"))


def model_patches(cfg, device_type: str, zero3: bool = False, attention: str | None = None) -> list[ModelPatch]:
    """The patches the run config asks for, in the order they are installed. `zero3`: parameters are partitioned
    (liger reads the head's weight directly, so the chunked loss there). `attention`: the kind the launch resolved
    (default: `cfg.attention` resolved for `device_type`, for a model built outside a run)."""
    patches: list[ModelPatch] = [
        AttentionPatch(
            # flex where it cannot train: refused here
            kind=attention or resolve_attention(cfg.attention, device_type),
            flex=FlexSettings(
                fold_padding=cfg.fold_padding,
                compile_mode=cfg.flex_compile_mode,
                kernel_options=cfg.flex_kernel_options,
            ),
        )
    ]
    if cfg.fused_gelu:
        patches.append(FusedGeluPatch())
    patches.append(LossPatch(liger=cfg.liger_loss and liger_available(device_type) and not zero3))
    if cfg.compile_blocks:
        patches.append(CompileBlocksPatch())
    return patches


def apply_patches(model, patches: list[ModelPatch]) -> dict[str, str]:
    """Install `patches` in order; log each, and for one that does not apply why and what runs instead. Returns
    {name: description} of those installed (also `model.job_patches`, which `print(model)` shows)."""
    installed: dict[str, str] = {}
    applied: list[ModelPatch] = []
    for patch in patches:
        reason = patch.not_applicable(model)
        if reason is not None:
            log.warning("model patch %s not installed (%s): %s runs", patch.name, reason, patch.stock)
            continue
        installed[patch.name] = patch.install(model)
        if patch.details():
            installed[f"{patch.name} settings"] = patch.details()
        applied.append(patch)
    model.job_patches = installed
    model.job_applied_patches = applied
    model.extra_repr = MethodType(_patched_repr, model)
    log.info("model patches: %s", "; ".join(f"{k} {v}" for k, v in installed.items()) or "none")
    return installed


def undo_patches(model) -> None:
    """Take every installed patch off again, newest first: the stock paths run (the benchmarks' baseline)."""
    for patch in reversed(getattr(model, "job_applied_patches", [])):
        patch.undo(model)
    model.job_applied_patches = []
    model.job_patches = {}
    model.__dict__.pop("extra_repr", None)


def _patched_repr(self) -> str:
    return "job patches: " + "; ".join(f"{k} {v}" for k, v in self.job_patches.items())
