"""The fast attention paths (job.attention) against stock HF Bloom eager attention, on tiny random models in fp32."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BloomForCausalLM
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

from job.core.errors import JobError
from job.model.attention import (
    FlexSettings,
    alibi_slopes,
    allowed_mask,
    document_ids,
    fold_padding,
    install_attention,
    resolve_attention,
)
from tests.conftest import tiny_bloom_config

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

BOS, EOS, PAD = 1, 2, 3
VOCAB = 96
ATOL = 1e-5


def pair(kind: str, seed: int = 0, **overrides) -> tuple[BloomForCausalLM, BloomForCausalLM]:
    """(stock model, same weights with `kind` installed), both in training mode (dropout is 0 in Bloom's config)."""
    torch.manual_seed(seed)
    stock = BloomForCausalLM(tiny_bloom_config(VOCAB, **overrides)).train()
    fast = copy.deepcopy(stock)
    install_attention(fast, kind)
    return stock, fast


def tokens(*lengths: int, seed: int = 1) -> list[torch.Tensor]:
    """Documents of ordinary tokens (no specials), one per length."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g) for n in lengths]


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(a: dict, b: dict, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("heads", [1, 4, 6, 12, 16])
def test_alibi_slopes_equal_blooms(heads):
    torch.testing.assert_close(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")), atol=0, rtol=0)
    mask = torch.ones(2, 9, dtype=torch.long)
    ours = (alibi_slopes(heads)[:, None] * torch.arange(9)).repeat(2, 1, 1).reshape(2 * heads, 1, 9)
    torch.testing.assert_close(ours, build_alibi_tensor(mask, heads, torch.float32), atol=0, rtol=0)


def test_document_ids_start_after_each_eos():
    ids = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 5, 6, 7, 8, 9, 10, 11]])
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.int32)
    assert torch.equal(document_ids(ids, EOS), expected)
    assert torch.equal(document_ids(ids, None), torch.zeros_like(expected))


def test_folded_padding_gives_the_padding_aware_mask():
    """Padding as one-token documents: the plain document-causal mask gives every real query the keys of the mask
    that also reads `valid` (left, right and inner padding); a padding query sees only itself, as documented."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, VOCAB, (3, 32), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.15] = EOS
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, 20:] = False
    valid[1, :9] = False
    valid[2, 5:7] = False
    docs = document_ids(ids, EOS)
    folded = allowed_mask(fold_padding(docs, valid), None)
    assert torch.equal(folded[valid], allowed_mask(docs, valid)[valid])  # every real query: the same keys
    assert torch.equal(folded[~valid], torch.eye(32, dtype=torch.bool).expand(3, 32, 32)[~valid])  # padding: itself
    assert torch.equal(fold_padding(docs, None), docs)


def test_flex_with_folded_padding_equals_the_masked_flex_on_cpu():
    """Forward on CPU (no flex backward there): padded and packed rows give the same logits either way."""
    stock, fast = pair("flex")
    unfolded = copy.deepcopy(stock)
    install_attention(unfolded, "flex", FlexSettings(fold_padding=False))
    ids = torch.stack(tokens(24, 24, seed=6))
    ids[0, 10] = EOS
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    with torch.no_grad():
        got = fast(ids, attention_mask=mask).logits
        want = unfolded(ids, attention_mask=mask).logits
    real = mask.bool()  # padding queries differ (folded: only themselves); they are never labels
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=1e-5)


def test_resolve_attention():
    assert resolve_attention("auto", "cuda") == "flex"
    assert resolve_attention("auto", "cpu") == "sdpa"
    assert resolve_attention("sdpa", "cuda") == "sdpa"
    assert resolve_attention("eager", "cpu") == "eager"
    assert resolve_attention("flex", "cuda") == "flex"
    with pytest.raises(JobError, match="no backward"):
        resolve_attention("flex", "cpu")
    with pytest.raises(JobError, match="unknown attention"):
        resolve_attention("flash", "cuda")


def test_flex_refuses_attention_dropout():
    with pytest.raises(JobError, match="attention_dropout"):
        pair("flex", attention_dropout=0.1)


def test_eager_restores_stock_code():
    stock, fast = pair("sdpa")
    assert "forward" in fast.transformer.__dict__
    install_attention(fast, "eager")
    assert "forward" not in fast.transformer.__dict__
    assert not any("forward" in m.__dict__ for m in fast.modules())
    ids = tokens(12)[0][None]
    torch.testing.assert_close(fast(ids).logits, stock(ids).logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------------- one document, no eos inside
@pytest.mark.parametrize("heads", [4, 6])
def test_sdpa_equals_eager_unpacked(heads):
    """Logits, stock loss and every parameter's gradient match the stock model with the same weights."""
    stock, fast = pair("sdpa", n_head=heads, hidden_size=96)
    ids = torch.stack(tokens(24, 24, seed=3))
    outs = [m(ids, labels=ids) for m in (stock, fast)]
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=ATOL, rtol=1e-5)
    for out in outs:
        out.loss.backward()
    assert_grads_close(grads(fast), grads(stock))


def test_sdpa_under_gradient_checkpointing():
    stock, fast = pair("sdpa")
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.stack(tokens(16, 16))
    outs = [m(ids, labels=ids) for m in (stock, fast)]
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=ATOL, rtol=1e-5)
    for out in outs:
        out.loss.backward()
    assert_grads_close(grads(fast), grads(stock))


def test_flex_forward_equals_eager_on_cpu():
    """FlexAttention runs forward (no backward) on CPU in torch 2.13: logits and loss match eager there."""
    stock, fast = pair("flex")
    ids = torch.stack(tokens(20, 20, seed=4))
    with torch.no_grad():
        ref, got = stock(ids, labels=ids), fast(ids, labels=ids)
    torch.testing.assert_close(got.logits, ref.logits, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got.loss, ref.loss, atol=ATOL, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("kind", ["sdpa", "flex"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_stock_at_real_positions(kind, side):
    stock, fast = pair(kind)
    docs = tokens(14, 9, 5, seed=5)
    length = max(len(d) for d in docs)
    ids = torch.full((len(docs), length), PAD)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs):
        span = slice(0, len(doc)) if side == "right" else slice(length - len(doc), length)
        ids[row, span], mask[row, span] = doc, 1
    with torch.no_grad():
        padded_stock = stock(ids, attention_mask=mask).logits
        got = fast(ids, attention_mask=mask).logits
        assert torch.isfinite(got).all()
        for row, doc in enumerate(docs):
            real = mask[row].bool()
            alone = stock(doc[None]).logits[0]
            torch.testing.assert_close(got[row, real], alone, atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(got[row, real], padded_stock[row, real], atol=ATOL, rtol=1e-4)


def test_padded_rows_gradients_equal_stock():
    """Right padding as the collator makes it (labels -100 on padding): loss and gradients equal the stock model's."""
    stock, fast = pair("sdpa")
    docs = tokens(16, 7, seed=6)
    ids = torch.full((2, 16), PAD)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs):
        ids[row, : len(doc)], mask[row, : len(doc)] = doc, 1
    labels = ids.masked_fill(mask == 0, -100)
    outs = [m(ids, attention_mask=mask, labels=labels) for m in (stock, fast)]
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=ATOL, rtol=1e-5)
    for out in outs:
        out.loss.backward()
    assert_grads_close(grads(fast), grads(stock))


# ------------------------------------------------------------------------------------------------- packed rows
def packed_row(docs: list[torch.Tensor], end_with_eos: list[bool]) -> tuple[torch.Tensor, list[slice]]:
    parts, spans, start = [], [], 0
    for doc, eos in zip(docs, end_with_eos, strict=True):
        part = torch.cat([doc, torch.tensor([EOS])]) if eos else doc
        parts.append(part)
        spans.append(slice(start, start + len(part)))
        start += len(part)
    return torch.cat(parts), spans


@pytest.mark.parametrize("kind", ["sdpa", "flex"])
def test_packed_documents_equal_each_document_alone(kind):
    """Each packed document's logits and loss equal that document run alone through the stock model."""
    stock, fast = pair(kind)
    # The last document is cut by the row's end (no eos), as packing leaves it; a 1-token document too.
    row0, spans0 = packed_row(tokens(7, 11, 1, 6, seed=7), [True, True, True, False])
    row1, spans1 = packed_row(tokens(20, 4, seed=8), [True, True])
    row1 = torch.cat([row1, tokens(row0.numel() - row1.numel(), seed=9)[0]])  # a tail document of its own
    spans1.append(slice(spans1[-1].stop, row0.numel()))
    ids = torch.stack([row0, row1])
    with torch.no_grad():
        got = fast(ids).logits
        for row, spans in ((0, spans0), (1, spans1)):
            for span in spans:
                doc = ids[row, span][None]
                alone = stock(doc, labels=doc)
                torch.testing.assert_close(got[row, span], alone.logits[0], atol=ATOL, rtol=1e-4)
                if span.stop - span.start > 1:
                    labels = torch.full_like(ids, -100)
                    labels[row, span.start + 1 : span.stop] = ids[row, span.start + 1 : span.stop]
                    doc_loss = fast(ids, labels=labels).loss
                    torch.testing.assert_close(doc_loss, alone.loss, atol=ATOL, rtol=1e-5)


def test_packed_document_gradients_equal_document_alone():
    """The backward respects document boundaries too: one document's loss gives the gradients of its run alone."""
    stock, fast = pair("sdpa")
    docs = tokens(9, 12, 8, seed=10)
    ids, spans = packed_row(docs, [True, True, True])
    ids = ids[None]
    span = spans[1]
    labels = torch.full_like(ids, -100)
    labels[0, span.start + 1 : span.stop] = ids[0, span.start + 1 : span.stop]
    fast(ids, labels=labels).loss.backward()
    doc = ids[:, span]
    stock(doc, labels=doc).loss.backward()
    assert_grads_close(grads(fast), grads(stock))


# --------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("kind", ["sdpa", "flex"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_stock(kind, use_cache):
    """With a cache the stock path runs; without one every step takes the fast path: both generate alike."""
    stock, fast = pair(kind)
    stock.eval()
    fast.eval()
    prompt = tokens(6, seed=11)[0][None]
    kwargs = dict(max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        want = stock.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        got = fast.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------- GPU
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (flex backward)")


@cuda_only
@pytest.mark.parametrize("kind", ["flex", "sdpa"])
def test_fast_attention_matches_eager_on_cuda(kind, monkeypatch):
    """fp32 on CUDA with TF32 off (flex compiled). Tolerances: logits atol = rtol = 1e-4; every parameter's gradient
    within 1e-3 relative L2 error. Packed documents against each document alone; a right-padded row against stock."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    stock, fast = (m.cuda() for m in pair(kind, hidden_size=128))
    row, spans = packed_row(tokens(40, 70, 30, seed=12), [True, True, False])
    padded = torch.cat([tokens(100, seed=13)[0], torch.full((row.numel() - 100,), PAD)])
    ids = torch.stack([row, padded]).cuda()
    mask = (ids != PAD).long()

    def close_grads():
        for (name, p), q in zip(fast.named_parameters(), stock.parameters(), strict=True):
            error = (p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
            assert error < 1e-3, f"{name}: relative gradient error {error:.2e}"
        fast.zero_grad()
        stock.zero_grad()

    with torch.no_grad():
        got = fast(ids, attention_mask=mask).logits
        for span in spans:
            torch.testing.assert_close(got[0, span], stock(ids[:1, span]).logits[0], atol=1e-4, rtol=1e-4)
        want = stock(ids[1:], attention_mask=mask[1:]).logits
        torch.testing.assert_close(got[1, :100], want[0, :100], atol=1e-4, rtol=1e-4)
    # The middle document's loss inside the packed row gives the gradients of that document alone.
    span = spans[1]
    labels = torch.full_like(ids[:1], -100)
    labels[0, span.start + 1 : span.stop] = ids[0, span.start + 1 : span.stop]
    fast(ids[:1], labels=labels).loss.backward()
    stock(ids[:1, span], labels=ids[:1, span]).loss.backward()
    close_grads()
    labels = ids[1:].masked_fill(mask[1:] == 0, -100)
    fast(ids[1:], attention_mask=mask[1:], labels=labels).loss.backward()
    stock(ids[1:], attention_mask=mask[1:], labels=labels).loss.backward()
    close_grads()


@cuda_only
@pytest.mark.parametrize("kind", ["flex", "sdpa"])
def test_fast_attention_bf16_on_cuda_is_no_worse_than_eager(kind):
    """bf16, the training dtype: the fast path's logits are as close to an fp32 eager reference as stock bf16 eager's
    (within 1.5x + 1e-2), and its backward gives finite gradients."""
    stock, fast = pair(kind, hidden_size=128)
    reference = copy.deepcopy(stock).cuda()
    stock, fast = stock.cuda().bfloat16(), fast.cuda().bfloat16()
    ids = torch.stack(tokens(512, 512, seed=14)).cuda()
    with torch.no_grad():
        want = reference(ids).logits
        stock_error = (stock(ids).logits.float() - want).abs().max()
        fast_error = (fast(ids).logits.float() - want).abs().max()
    assert fast_error <= 1.5 * stock_error + 1e-2, (fast_error, stock_error)
    fast(ids, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())
