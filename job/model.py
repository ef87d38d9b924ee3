"""Loading or initialising the Bloom model, its fast attention and a loss that never builds the full logits.

`build_model(cfg, tokenizer)` loads a local HF folder laid out like Langboat/bloom-389m-zh (never a hub download
at run time) or random-initialises a preset, then `install_patches` installs, in one place, what the run config
asks for: the attention kind `resolve_attention` picks for the device (see `job.attention`), the fused GELU, the
loss (liger-kernel's fused linear + cross-entropy on CUDA when importable, else the chunked loss below) and
per-block compilation. It logs what it installed and `print(model)` shows it. None of them changes the config,
the class or the weights: `save_pretrained` writes a plain HF Bloom folder that stock transformers loads.

The chunked loss: Bloom's head on a 42k vocabulary makes logits [B, T, V] and the stock loss upcasts them to
fp32 (B=8, T=1024: 1.4 GB, plus as much again for their gradient). When `labels` are given (and no cache,
`return_dict=False` or `logits_to_keep` is asked for), the patched `forward` instead runs the head and the
cross-entropy over chunks of `CHUNK_TOKENS` tokens, each under `torch.utils.checkpoint`, so the backward
re-computes one chunk's logits at a time. It returns `logits=None`. Reductions are those of transformers'
`ForCausalLMLoss`: mean over non-ignored shifted labels, or their sum / `num_items_in_batch` when the Trainer
passes that (gradient accumulation).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from types import MethodType

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from job.attention import FlexSettings, install_attention, resolve_attention, training_shaped
from job.errors import JobError

log = logging.getLogger("job")

__all__ = [
    "CHUNK_TOKENS",
    "PRESET_SHAPES",
    "build_model",
    "chunked_causal_lm_loss",
    "config_parameter_count",
    "flops_per_token",
    "install_attention",
    "install_chunked_loss",
    "install_fused_gelu",
    "install_patches",
    "liger_available",
    "model_config",
    "parameter_count",
    "resolve_attention",
    "restore_stock",
]

PRESET_SHAPES = {
    "tiny": {"hidden_size": 128, "n_layer": 4, "n_head": 4},
    # Langboat/bloom-389m-zh: vocab 42,437, tied embeddings, 345.8M parameters at that vocabulary.
    "bloom-389m-zh": {"hidden_size": 1024, "n_layer": 24, "n_head": 16},
}
VOCAB_MULTIPLE = 64  # random-init vocabularies are rounded up to this (tensor-core friendly shapes)
CHUNK_TOKENS = 2048  # tokens per loss chunk: 2048 x 42k fp32 logits = 350 MB at a time
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ------------------------------------------------------------------------------------------------- config
def model_config(cfg, vocab: int | None):
    """The model's config: read and checked from `cfg.model`, else the preset's for a tokenizer of `vocab`."""
    from transformers import BloomConfig

    if not cfg.model:
        size = -(-(vocab or 8000) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        return BloomConfig(vocab_size=size, **PRESET_SHAPES[cfg.preset])
    folder = Path(cfg.model)
    if not folder.is_dir():
        raise JobError(
            f"model folder {folder} does not exist",
            "pass a local HF folder laid out like Langboat/bloom-389m-zh (config.json + weights) to --model",
        )
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"{path} is missing", "point --model at an HF model folder that has config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JobError(f"{path} is not valid JSON ({e})", "fix the file or download the model again") from None
    if not isinstance(data, dict):
        raise JobError(f"{path} holds a {type(data).__name__}, not a config object", "download the model again")
    remote = bool(getattr(cfg, "trust_remote_code", False)) and "AutoModelForCausalLM" in (data.get("auto_map") or {})
    if data.get("model_type") != "bloom" and not remote:
        raise JobError(
            f"{path} is not a Bloom causal LM config (model_type={data.get('model_type')!r})",
            "use a Bloom model such as Langboat/bloom-389m-zh (or --trust-remote-code for a Bloom-like "
            "model whose config maps AutoModelForCausalLM)",
        )
    try:
        if remote:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
        else:
            config = BloomConfig.from_dict(data)
    except Exception as e:
        raise JobError(
            f"{path} is not a usable Bloom config ({type(e).__name__}: {e})".replace("\n", " "),
            "fix config.json or download the model again",
        ) from None
    if vocab is not None and vocab > config.vocab_size:
        raise JobError(
            f"len(tokenizer)={vocab} > model vocab {config.vocab_size}: some token ids have no embedding",
            "use the model's own tokenizer (or one no larger than its vocabulary)",
        )
    return config


# --------------------------------------------------------------------------------------------------- build
def build_model(cfg, tokenizer):
    """The model for `cfg`: loaded from `cfg.model` or random-initialised from `cfg.preset`, fast paths installed.

    Seed-determinism of the random init is the caller's (`transformers.set_seed`) before this call.
    """
    from transformers import AutoModelForCausalLM, BloomForCausalLM

    config = model_config(cfg, len(tokenizer))
    if cfg.model:
        folder = Path(cfg.model)
        if not any((folder / name).exists() for name in WEIGHT_FILES):
            raise JobError(
                f"{folder} has no weights ({' / '.join(WEIGHT_FILES[::2])})",
                "point --model at a complete HF model folder",
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), trust_remote_code=cfg.trust_remote_code, dtype=torch.float32
            )  # fp32 master weights
        except (OSError, ValueError, RuntimeError) as e:
            raise JobError(
                f"cannot load the model in {folder} ({type(e).__name__}: {e})".replace("\n", " "),
                "check the folder's weights match its config.json",
            ) from None
        rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise JobError(
                f"len(tokenizer)={len(tokenizer)} > model vocab {rows}",
                "use the model's own tokenizer (or one no larger than its vocabulary)",
            )
    else:
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.unk_token_id = tokenizer.unk_token_id
        model = BloomForCausalLM(config)

    device_type = "cuda" if torch.cuda.is_available() and getattr(cfg, "device", "auto") != "cpu" else "cpu"
    install_patches(model, cfg, device_type)
    return model


# ------------------------------------------------------------------------------------------------- patches
def install_patches(model, cfg, device_type: str) -> dict[str, str]:
    """Every patch the run config asks for, in one place; logs and returns what it installed.

    Each is exact (tests/test_model.py, tests/test_attention.py) and leaves the class, config and weights stock.
    A model that is not an HF Bloom gets none of them (its own attention with `--attention auto`).
    """
    from transformers import BloomForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    is_bloom = isinstance(model, BloomForCausalLM)
    kind = "eager" if cfg.attention == "auto" and not is_bloom else resolve_attention(cfg.attention, device_type)
    flex = FlexSettings(
        fold_padding=cfg.fold_padding,
        compile_mode=cfg.flex_compile_mode,
        kernel_options=json.loads(cfg.flex_kernel_options or "{}"),  # checked by RunConfig.validate
    )
    install_attention(model, kind, flex)
    installed = {"attention": kind}
    if kind == "flex":
        installed["flex"] = (
            f"mode={flex.compile_mode}, padding {'folded into documents' if flex.fold_padding else 'as a mask'}"
            + (f", kernel_options={flex.kernel_options}" if flex.kernel_options else "")
        )
    if is_bloom:
        if cfg.fused_gelu:
            installed["gelu"] = install_fused_gelu(model)
        # liger reads the head's weight directly: under ZeRO-3 that is a partition, so the chunked loss there.
        liger = cfg.liger_loss and liger_available(device_type) and not is_deepspeed_zero3_enabled()
        install_chunked_loss(model, loss="liger" if liger else "chunked")
        installed["loss"] = "liger fused linear+cross-entropy" if liger else f"chunked ({CHUNK_TOKENS} tokens)"
        if cfg.compile_blocks:
            for block in model.transformer.h:
                block.compile(dynamic=False)  # in place: state-dict keys stay stock (no `_orig_mod.`)
            installed["compile"] = f"each of {len(model.transformer.h)} BloomBlocks (dynamic=False)"
    model.job_patches = installed
    model.extra_repr = MethodType(_patched_repr, model)
    log.info("model patches: %s", "; ".join(f"{k} {v}" for k, v in installed.items()))
    return installed


def _patched_repr(self) -> str:
    return "job patches: " + "; ".join(f"{k} {v}" for k, v in self.job_patches.items())


def liger_available(device_type: str) -> bool:
    """liger-kernel's Triton kernels run on CUDA only, and only where it and Triton are installed."""
    return device_type == "cuda" and all(importlib.util.find_spec(m) for m in ("liger_kernel", "triton"))


def _fused_gelu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # BloomGelu's tanh formula, one kernel forward and one backward


def install_fused_gelu(model) -> str:
    """Every `BloomGelu` computes through `F.gelu(approximate="tanh")` (the same function, ~27 fewer kernels)."""
    from transformers.models.bloom.modeling_bloom import BloomGelu

    modules = [m for m in model.modules() if isinstance(m, BloomGelu)]
    for module in modules:
        module.forward = MethodType(_fused_gelu_forward, module)
    return f"F.gelu(tanh) in {len(modules)} MLPs"


# ---------------------------------------------------------------------------------------------------- loss
def _chunk_loss_sum(head, hidden, targets, ignore_index):
    logits = head(hidden).float()  # what the stock loss does to the full logits, one chunk at a time
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def _chunks_loss_sum(head, hidden, targets, ignore_index, chunk_tokens):
    # One chunk's logits alive at a time: a single chunk may keep its own for the backward (no recompute needed).
    recompute = (
        hidden.shape[0] > chunk_tokens
        and torch.is_grad_enabled()
        and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    )
    total = None
    for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True):
        if recompute:
            part = checkpoint(_chunk_loss_sum, head, h, t, ignore_index, use_reentrant=False)
        else:
            part = _chunk_loss_sum(head, h, t, ignore_index)
        total = part if total is None else total + part
    return total


def _liger_loss_sum(head, hidden, targets, ignore_index):
    """liger-kernel's fused linear + cross-entropy (Triton, CUDA): the logits are never materialised.

    It takes the head's weight, not the module (so not under ZeRO-3): the matmul runs in the autocast dtype when
    autocast is on, as the stock head would, and the head's gradient is summed in fp32.
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    weight = head.weight
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum", accum_dtype=torch.float32)
    return fused(weight, hidden, targets)


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor | None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    liger: bool = False,
    **_,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss(head(hidden_states), labels, ...)` without materialising all logits.

    `head` is called as a module (not its weight) so ZeRO-3 gathers its parameters, also in the recompute.
    `liger=True` computes the same sum with liger-kernel's fused kernel instead of the chunks.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    if liger:
        total = _liger_loss_sum(head, hidden, targets, ignore_index)
    else:
        total = _chunks_loss_sum(head, hidden, targets, ignore_index, chunk_tokens)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _causal_lm_forward(
    self,
    input_ids=None,
    cache=None,
    attention_mask=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    logits_to_keep=0,
    **kwargs,
):
    """`BloomForCausalLM.forward` with the chunked loss when labels are given; the stock forward otherwise."""
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    return_dict = self.config.return_dict if return_dict is None else return_dict
    if (
        labels is None
        or not training_shaped(cache, use_cache, output_attentions, kwargs.get("past_key_values"))
        or not return_dict
        or not isinstance(logits_to_keep, int)
        or logits_to_keep != 0
    ):
        return type(self).forward(
            self,
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
    outputs = self.transformer(
        input_ids,
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        use_cache=False,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        return_dict=True,
    )
    loss = chunked_causal_lm_loss(
        outputs.last_hidden_state,
        self.lm_head,
        labels,
        chunk_tokens=getattr(self, "job_loss_chunk_tokens", CHUNK_TOKENS),
        liger=getattr(self, "job_loss", "chunked") == "liger",
        **kwargs,
    )
    return CausalLMOutputWithCrossAttentions(
        loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


def install_chunked_loss(model, chunk_tokens: int = CHUNK_TOKENS, loss: str = "chunked") -> None:
    """Give a `BloomForCausalLM` the chunked (or `loss="liger"`) loss in place; the class and config stay stock."""
    model.job_loss_chunk_tokens = chunk_tokens
    model.job_loss = loss
    model.forward = MethodType(_causal_lm_forward, model)


def restore_stock(model) -> None:
    """Undo `install_patches` (bar compilation): stock eager attention, GELU and full-logits loss (the baseline)."""
    from transformers.models.bloom.modeling_bloom import BloomGelu

    install_attention(model, "eager")
    for module in model.modules():
        if isinstance(module, BloomGelu):
            module.__dict__.pop("forward", None)
    for name in ("forward", "job_loss_chunk_tokens", "job_loss", "extra_repr"):
        model.__dict__.pop(name, None)
    model.job_patches = {"attention": "eager"}


# --------------------------------------------------------------------------------------------------- sizes
def parameter_count(model) -> int:
    """Parameters, tied embeddings once (also under ZeRO-3, where a partitioned tensor reports `ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def config_parameter_count(model_config) -> int:
    """A Bloom config's parameter count without building it (equals `parameter_count` of the built model)."""
    d, layers, vocab = model_config.hidden_size, model_config.n_layer, model_config.vocab_size
    n = vocab * d + layers * (12 * d * d + 13 * d) + 4 * d  # embeddings, blocks, embedding LN + final LN
    if not getattr(model_config, "tie_word_embeddings", True):
        n += vocab * d  # an untied head
    return n


def flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token by PaLM's formula 6N + 12*L*d*T (tied embeddings once in N: the head is real work)."""
    return 6.0 * config_parameter_count(model_config) + 12.0 * model_config.n_layer * model_config.hidden_size * seq_len
