"""Fast, exact attention for HF Bloom: SDPA or FlexAttention with ALiBi, causal, per-document and padding masks.

transformers' Bloom only has its eager attention (baddbmm + ALiBi + fp32 softmax + bmm), the largest single cost
of a training step. `install_attention(model, "sdpa" | "flex")` patches a loaded Bloom in place, without new
parameters, config changes or remote code, so what it saves is a plain HF Bloom checkpoint:

- `model.transformer.forward` (`BloomModel`) runs its own loop over the blocks whenever `input_ids` are given and
  the call is `training_shaped` (no cache passed or asked for, no `output_attentions`; `job.model`'s loss uses the
  same test).
  It derives each token's document from `input_ids` (a new document starts right after every eos, i.e. the
  document id is the number of eos tokens strictly before the position) and builds, once per forward, what every
  layer needs: an additive float bias for SDPA (ALiBi + causal/document/padding mask), or ALiBi slopes for a
  FlexAttention `score_mod` plus a `BlockMask`. Any other call (generation with a cache, `output_attentions`,
  `inputs_embeds`) goes to the stock forward, and with it the stock eager attention, unchanged.
- each `BloomAttention.forward` dispatches on what it is given: the stock model passes an ALiBi tensor, so it
  runs the stock code; the loop above passes `alibi=None` + a bias tensor (SDPA) or slopes + a `BlockMask` (flex).

A token attends to itself and to earlier, non-padding tokens of its own document. ALiBi is applied as
slope * (key - query), which equals Bloom's slope * key_position up to a per-row constant (softmax ignores it),
also under left or right padding. For flex, padding is folded into the document ids (each padding position a
document of its own), so the `mask_mod` reads one tensor and a padding query attends only to itself (its output
is never a label; sdpa lets it see its document's earlier tokens, as the stock model does).

Generation: `generate` passes a cache, so it runs the stock code (and matches the stock model). With
`use_cache=False` every step takes the fast path, whose document masks then also split a prompt at its eos tokens.
On CPU flex runs uncompiled and forward-only (torch has no FlexAttention backward there); on CUDA it is compiled.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from types import MethodType

import torch
import torch.nn.functional as F

from job.core.errors import JobError

FAST_KINDS = ("sdpa", "flex")
KINDS = ("eager", *FAST_KINDS)
_compiled_flex: dict[str, object] = {}  # one compiled flex_attention per torch.compile mode


@dataclass(frozen=True)
class FlexSettings:
    """How FlexAttention runs (bench variants; the defaults are the expected winners)."""

    fold_padding: bool = True  # padding folded into the document ids: mask_mod reads one tensor
    compile_mode: str = "default"  # torch.compile mode of flex_attention
    kernel_options: dict = field(default_factory=dict)  # flex_attention(kernel_options=...), e.g. fwd_num_warps


def training_shaped(cache=None, use_cache=None, output_attentions=None, past_key_values=None) -> bool:
    """The one test of every patch here and in `job.model`: a forward that neither reads nor builds a cache and
    returns no attention maps (training and evaluation). Anything else (generation) runs the stock code."""
    return cache is None and past_key_values is None and not use_cache and not output_attentions


# ------------------------------------------------------------------------------------------------- choosing
def resolve_attention(kind: str, device_type: str) -> str:
    """`auto` -> the fastest kind that trains on `device_type`: flex on CUDA, sdpa elsewhere."""
    if kind == "auto":
        return "flex" if device_type == "cuda" else "sdpa"
    if kind not in KINDS:
        raise JobError(f"unknown attention {kind!r}", f"choose one of auto, {', '.join(KINDS)}")
    if kind == "flex" and device_type not in ("cuda", "xpu"):
        raise JobError(
            f"--attention flex cannot train on {device_type}: FlexAttention has no backward there",
            "use --attention sdpa (or auto)",
        )
    return kind


def install_attention(model, kind: str, flex: FlexSettings | None = None) -> None:
    """Patch `model` (a Bloom causal LM or `BloomModel`) in place; "eager" restores the stock HF code paths."""
    from transformers.models.bloom.modeling_bloom import BloomAttention, BloomModel

    if kind == "auto":
        kind = resolve_attention(kind, next(model.parameters()).device.type)
    if kind not in KINDS:
        raise JobError(f"unknown attention {kind!r}", f"choose one of auto, {', '.join(KINDS)}")
    base = getattr(model, "transformer", model)
    if not isinstance(base, BloomModel):
        if kind == "eager":
            model.job_attention = kind
            return
        raise JobError(
            f"--attention {kind} supports HF Bloom only, not {type(model).__name__}",
            "use --attention eager for this model",
        )
    if kind == "flex" and base.config.attention_dropout > 0:
        raise JobError(
            f"FlexAttention has no attention dropout but the model's config sets attention_dropout="
            f"{base.config.attention_dropout}",
            "use --attention sdpa",
        )
    attentions = [m for m in base.modules() if isinstance(m, BloomAttention)]
    if kind == "eager":
        for module in [base, *attentions]:
            module.__dict__.pop("forward", None)
    else:
        base.forward = patched_forward(base, _bloom_model_forward)
        for module in attentions:
            module.forward = MethodType(_bloom_attention_forward, module)
            module.job_flex = flex or FlexSettings()
    base.job_attention = kind
    base.job_flex = flex or FlexSettings()
    model.job_attention = kind


# ----------------------------------------------------------------------------------------- masks and biases
def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bloom's per-head ALiBi slopes (float32), computed as `build_alibi_tensor` does."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.full((), 2 ** (-(2 ** -(math.log2(closest) - 3))), device=device, dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, device=device, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.full((), 2 ** (-(2 ** -(math.log2(2 * closest) - 3))), device=device, dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, device=device, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def document_ids(input_ids: torch.Tensor, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """[B, T] int32: the number of eos tokens strictly before each position (a document ends with its eos)."""
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if not eos:
        return torch.zeros_like(input_ids, dtype=torch.int32)
    if len(eos) == 1:
        is_eos = (input_ids == eos[0]).to(torch.int32)
    else:
        is_eos = torch.isin(input_ids, torch.tensor(eos, device=input_ids.device)).to(torch.int32)
    return torch.cumsum(is_eos, dim=-1, dtype=torch.int32) - is_eos


def fold_padding(docs: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Document ids with each padding position its own one-token document (ids below 0 never clash with 0, 1, ...).

    The document-causal mask over these ids is exactly the padding-aware one: a padding key is seen by no other
    query, a padding query sees only itself. So the mask needs no second tensor (no `valid[b, kv]` read per score).
    """
    if valid is None:
        return docs
    pad_ids = -1 - torch.arange(docs.shape[-1], device=docs.device, dtype=docs.dtype)
    return torch.where(valid, docs, pad_ids)


def allowed_mask(docs: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """[B, Tq, Tk] bool: key is not after the query, in the same document and not padding; or is the query."""
    pos = torch.arange(docs.shape[-1], device=docs.device)
    allowed = (docs[:, :, None] == docs[:, None, :]) & (pos[None, :] <= pos[:, None])
    if valid is not None:
        allowed = allowed & valid[:, None, :]
    return allowed | (pos[None, :] == pos[:, None])


def sdpa_bias(slopes: torch.Tensor, docs: torch.Tensor, valid: torch.Tensor | None, dtype: torch.dtype):
    """[B, H, T, T] additive bias for SDPA: slope * (key - query) where allowed, the dtype's minimum elsewhere."""
    pos = torch.arange(docs.shape[-1], device=docs.device, dtype=torch.float32)
    alibi = (slopes[:, None, None] * (pos[None, :] - pos[:, None])).to(dtype)  # [H, Tq, Tk]
    return torch.where(allowed_mask(docs, valid)[:, None], alibi[None], torch.finfo(dtype).min)


def flex_block_mask(docs: torch.Tensor, valid: torch.Tensor | None, fold: bool = True):
    """The same mask as `allowed_mask`, as a FlexAttention `BlockMask` (blocks outside every document skipped).

    `fold` (the default) folds padding into the document ids, so `mask_mod` is the plain document-causal one;
    without it `mask_mod` also reads `valid` (kept as a bench variant: `--no-fold-padding` measures what folding saves).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if fold:
        docs, valid = fold_padding(docs, valid), None

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (docs[b, q_idx] == docs[b, kv_idx]) & (kv_idx <= q_idx)
        if valid is None:
            return allowed
        return (allowed & valid[b, kv_idx]) | (q_idx == kv_idx)

    batch, length = docs.shape
    return create_block_mask(mask_mod, batch, None, length, length, device=docs.device)


def attention_inputs(
    kind: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    eos_token_id,
    num_heads: int,
    dtype: torch.dtype,
    flex: FlexSettings | None = None,
) -> tuple[torch.Tensor | None, object]:
    """(alibi, attention_mask) to hand every block: (None, bias) for sdpa, (slopes, BlockMask) for flex."""
    docs = document_ids(input_ids, eos_token_id)
    valid = None if attention_mask is None else attention_mask.to(input_ids.device).bool()
    slopes = alibi_slopes(num_heads, input_ids.device)
    if kind == "flex":
        return slopes, flex_block_mask(docs, valid, fold=(flex or FlexSettings()).fold_padding)
    return None, sdpa_bias(slopes, docs, valid, dtype)


def _flex(query, key, value, slopes, block_mask, scale, settings: FlexSettings):
    from torch.nn.attention.flex_attention import flex_attention

    def alibi_score(score, b, h, q_idx, kv_idx):
        return score + (slopes[h] * (kv_idx - q_idx)).to(score.dtype)

    on_cpu = query.device.type == "cpu"
    if on_cpu or torch.compiler.is_compiling():
        # CPU: forward only (no backward there), eager flex needs no compiler. Inside a compiled block (the
        # compile_blocks lever) that compilation covers flex too, in its own mode.
        fn = flex_attention
    else:  # uncompiled flex materialises the scores: always compile it on accelerators
        mode = settings.compile_mode
        if mode not in _compiled_flex:
            _compiled_flex[mode] = torch.compile(
                flex_attention, dynamic=False, mode=None if mode == "default" else mode
            )
        fn = _compiled_flex[mode]
    options = None if on_cpu else dict(settings.kernel_options) or None
    return fn(query, key, value, score_mod=alibi_score, block_mask=block_mask, scale=scale, kernel_options=options)


# ------------------------------------------------------------------------------------------- patched forwards
def _bloom_attention_forward(
    self,
    hidden_states,
    residual,
    alibi,
    attention_mask,
    layer_past=None,
    use_cache=False,
    output_attentions=False,
    **kwargs,
):
    """`BloomAttention.forward` with SDPA or FlexAttention; the stock code for anything the stock model passes."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.models.bloom.modeling_bloom import dropout_add

    is_flex = isinstance(attention_mask, BlockMask)
    if alibi is not None and not is_flex:
        return type(self).forward(
            self,
            hidden_states,
            residual,
            alibi,
            attention_mask,
            layer_past=layer_past,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
    batch, length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # 3 x [B, H, T, D]
    if is_flex:
        context = _flex(query, key, value, alibi, attention_mask, self.inv_norm_factor, self.job_flex)
    else:
        dropout = self.attention_dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask.to(query.dtype), dropout_p=dropout, scale=self.inv_norm_factor
        )
    context = context.transpose(1, 2).reshape(batch, length, self.hidden_size)
    if self.pretraining_tp > 1 and self.slow_but_exact:  # as the stock layer: the output projection in slices
        step = self.hidden_size // self.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(self.pretraining_tp):
            output = output + F.linear(
                context[:, :, i * step : (i + 1) * step], self.dense.weight[:, i * step : (i + 1) * step]
            )
    else:
        output = self.dense(context)
    return dropout_add(output, residual, self.hidden_dropout, self.training), None


def patched_forward(module, function):
    """`function` as `module`'s forward, showing the stock forward's signature: the Trainer and `generate` read from
    it which arguments the model takes (labels, cache, loss keywords), and callers pass them by name."""
    function.__signature__ = inspect.signature(type(module).forward)
    return MethodType(function, module)


def stock_forward(module, input_ids, arguments: dict):
    """The class's own `forward` (a patch is an instance attribute over it) with the arguments the patched forward
    received: every call a fast path does not take."""
    return type(module).forward(module, input_ids, **arguments)


def trains_fast(module, arguments: dict) -> bool:
    """Whether a patched forward's call (keyword `arguments`, as HF passes them) is training-shaped."""
    attentions = arguments.get("output_attentions")
    attentions = module.config.output_attentions if attentions is None else attentions
    return training_shaped(
        arguments.get("cache"), arguments.get("use_cache"), attentions, arguments.get("past_key_values")
    )


def _bloom_model_forward(self, input_ids=None, **arguments):
    """`BloomModel.forward` (its keyword arguments): the fast loop for training-shaped calls, the stock forward for
    everything else."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    if (
        input_ids is None
        or arguments.get("inputs_embeds") is not None
        or not trains_fast(self, arguments)
        or getattr(self, "job_attention", None) not in FAST_KINDS
    ):
        return stock_forward(self, input_ids, arguments)
    attention_mask = arguments.get("attention_mask")
    output_hidden_states = arguments.get("output_hidden_states")
    output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
    return_dict = arguments.get("return_dict")
    return_dict = self.config.return_dict if return_dict is None else return_dict

    hidden_states = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
    device_type = hidden_states.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden_states.dtype
    alibi, mask = attention_inputs(
        self.job_attention, input_ids, attention_mask, self.config.eos_token_id, self.num_heads, dtype, self.job_flex
    )
    all_hidden_states = () if output_hidden_states else None
    for block in self.h:
        if output_hidden_states:
            all_hidden_states = (*all_hidden_states, hidden_states)
        hidden_states = block(hidden_states, alibi=alibi, attention_mask=mask)[0]
    hidden_states = self.ln_f(hidden_states)
    if output_hidden_states:
        all_hidden_states = (*all_hidden_states, hidden_states)
    if not return_dict:
        return tuple(v for v in (hidden_states, all_hidden_states) if v is not None)
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, hidden_states=all_hidden_states)
