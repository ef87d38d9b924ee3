"""A causal-LM loss that never builds the full logits, as a `BloomForCausalLM.forward` installed in place.

Bloom's head on a 42k vocabulary makes logits [B, T, V] and the stock loss upcasts them to fp32 (B=8, T=1024:
1.4 GB, plus as much again for their gradient). When `labels` are given (and no cache, `return_dict=False` or
`logits_to_keep` is asked for), the installed `forward` instead runs the head and the cross-entropy over chunks of
`CHUNK_TOKENS` tokens, each under `torch.utils.checkpoint`, so the backward re-computes one chunk's logits at a
time. It returns `logits=None`. Reductions are those of transformers' `ForCausalLMLoss`: mean over non-ignored
shifted labels, or their sum / `num_items_in_batch` when the Trainer passes that (gradient accumulation). With
liger-kernel (CUDA, Triton) its fused linear + cross-entropy computes the same sum without any logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from job.model.attention import patched_forward, stock_forward, trains_fast

CHUNK_TOKENS = 2048  # tokens per loss chunk: 2048 x 42k fp32 logits = 350 MB at a time


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


# BloomForCausalLM.forward's own parameters; whatever else a call passes goes on to the loss (num_items_in_batch)
FORWARD_PARAMETERS = frozenset(
    {
        "cache",
        "attention_mask",
        "inputs_embeds",
        "labels",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "logits_to_keep",
    }
)


def _causal_lm_forward(self, input_ids=None, **arguments):
    """`BloomForCausalLM.forward` (its keyword arguments) with the chunked loss when labels are given; the stock
    forward otherwise."""
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    labels, logits_to_keep = arguments.get("labels"), arguments.get("logits_to_keep", 0)
    return_dict = arguments.get("return_dict")
    if (
        labels is None
        or not trains_fast(self, arguments)
        or not (self.config.return_dict if return_dict is None else return_dict)
        or not isinstance(logits_to_keep, int)
        or logits_to_keep != 0
    ):
        return stock_forward(self, input_ids, arguments)
    outputs = self.transformer(
        input_ids,
        attention_mask=arguments.get("attention_mask"),
        inputs_embeds=arguments.get("inputs_embeds"),
        use_cache=False,
        output_attentions=arguments.get("output_attentions"),
        output_hidden_states=arguments.get("output_hidden_states"),
        return_dict=True,
    )
    kwargs = {k: v for k, v in arguments.items() if k not in FORWARD_PARAMETERS}
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
    model.forward = patched_forward(model, _causal_lm_forward)


def uninstall_chunked_loss(model) -> None:
    """Back to the stock `forward` and its full-logits loss."""
    for name in ("forward", "job_loss_chunk_tokens", "job_loss"):
        model.__dict__.pop(name, None)
