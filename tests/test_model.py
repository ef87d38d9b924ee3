"""job.model: building/loading the model, the chunked loss, sizes; fp32 tiny models on CPU."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from job.core.config import RunConfig
from job.core.errors import JobError
from job.core.units import config_parameter_count, flops_per_token
from job.model import build
from job.model.attention import install_attention
from job.model.build import model_config, parameter_count
from job.model.loss import chunked_causal_lm_loss, install_chunked_loss
from job.model.patches import FusedGeluPatch, apply_patches, model_patches, undo_patches
from job.run.training_args import run_training_arguments
from tests.conftest import tiny_bloom as shared_tiny_bloom

EOS, PAD = 2, 3


def build_model(cfg, tokenizer, device_type: str = "cpu"):
    """The model as the trainer gets it: built stock, then the run config's patches applied."""
    model = build.build_model(cfg, tokenizer)
    apply_patches(model, model_patches(cfg, device_type))
    return model


class StandInTokenizer:
    """Just what build_model reads from a tokenizer."""

    def __init__(self, size: int):
        self.size = size
        self.unk_token_id, self.bos_token_id, self.eos_token_id, self.pad_token_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return self.size


def tiny_bloom(vocab: int = 96, seed: int = 0, **overrides) -> BloomForCausalLM:
    return shared_tiny_bloom(vocab, seed, **overrides)


def expected_parameters(vocab: int, d: int, layers: int) -> int:
    return vocab * d + layers * (12 * d * d + 13 * d) + 4 * d


# ------------------------------------------------------------------------------------------------- chunked loss
@pytest.mark.parametrize("num_items", [None, "tensor", "int"])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_chunked_loss_equals_stock_loss_and_gradients(num_items, chunk):
    torch.manual_seed(0)
    batch, length, d, vocab = 3, 11, 16, 50
    head = torch.nn.Linear(d, vocab, bias=False)
    hidden = torch.randn(batch, length, d, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, 3:6] = -100
    labels[2, 8:] = -100
    # num_items_in_batch is counted over several micro-batches (gradient accumulation): larger than this one's count.
    count = int((labels[..., 1:] != -100).sum()) + 17
    items = {None: None, "tensor": torch.tensor(count), "int": count}[num_items]

    want = ForCausalLMLoss(head(hidden), labels, vocab, num_items_in_batch=items)
    want_grads = torch.autograd.grad(want, [hidden, head.weight])
    got = chunked_causal_lm_loss(hidden, head, labels, num_items_in_batch=items, chunk_tokens=chunk)
    got_grads = torch.autograd.grad(got, [hidden, head.weight])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_chunked_loss_takes_shift_labels_and_ignore_index():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 20, bias=False)
    hidden = torch.randn(2, 9, 8)
    shift = torch.randint(0, 20, (2, 9))
    shift[1, :4] = -1
    want = ForCausalLMLoss(head(hidden), None, 20, shift_labels=shift, ignore_index=-1)
    got = chunked_causal_lm_loss(hidden, head, None, shift_labels=shift, ignore_index=-1, chunk_tokens=5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_model_loss_never_materialises_full_logits():
    """Every head call (forward and backward recompute) sees at most one chunk of tokens; no logits come back."""
    model = tiny_bloom(vocab=4096)
    install_attention(model, "sdpa")
    install_chunked_loss(model, chunk_tokens=16)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape))
    ids = torch.randint(4, 4096, (2, 40))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    out.loss.backward()
    assert {tuple(shape) for shape in rows} == {(16, 4096)}  # 80 tokens in chunks of 16, never [2, 40, 4096]
    assert len(rows) == 2 * 5  # 5 chunks, each run forward and once more in the backward
    assert model.transformer.word_embeddings.weight.grad is not None  # the tied head got its gradient


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
def test_model_chunked_loss_equals_stock(kind):
    """Through the whole model, in training and evaluation, with the Trainer's num_items_in_batch or without."""
    stock = tiny_bloom().train()
    model = copy.deepcopy(stock)
    install_attention(model, kind)
    install_chunked_loss(model, chunk_tokens=13)
    ids = torch.randint(4, 96, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    ids[1, 15:] = PAD
    labels = ids.masked_fill(mask == 0, -100)
    items = torch.tensor(int((labels[..., 1:] != -100).sum()) * 2)  # as if a second micro-batch were coming
    for extra in ({}, {"num_items_in_batch": items}):
        stock.zero_grad()
        model.zero_grad()
        want = stock(ids, attention_mask=mask, labels=labels, **extra)
        got = model(ids, attention_mask=mask, labels=labels, **extra)
        assert got.logits is None
        torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
        want.loss.backward()
        got.loss.backward()
        for (name, p), q in zip(model.named_parameters(), stock.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    stock.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, attention_mask=mask, labels=labels).loss,
            stock(ids, attention_mask=mask, labels=labels).loss,
            atol=1e-5,
            rtol=1e-5,
        )
        assert model(ids).logits.shape == (2, 24, 96)  # without labels: the full logits, as stock


def test_trainer_with_gradient_accumulation_equals_stock(tmp_path):
    """HF Trainer passes num_items_in_batch (counted over shifted labels) to the patched forward: two SGD steps of
    2 x 4 padded rows give the stock model's weights."""
    import datasets
    from transformers import Trainer, TrainingArguments

    model = build_model(RunConfig(preset="tiny", attention="sdpa"), StandInTokenizer(100))
    assert {"labels", "cache", "logits_to_keep"} <= set(inspect.signature(model.forward).parameters)
    stock = BloomForCausalLM(model.config)
    stock.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    rows = datasets.Dataset.from_dict(
        {
            "input_ids": torch.randint(4, 100, (16, 24), generator=g).tolist(),
            "n": torch.randint(5, 25, (16,), generator=g).tolist(),
        }
    )

    def collate(batch):
        ids = torch.tensor([r["input_ids"] for r in batch])
        mask = (torch.arange(ids.shape[1])[None] < torch.tensor([r["n"] for r in batch])[:, None]).long()
        ids = ids.masked_fill(mask == 0, PAD)  # right padding, as the collator makes it
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    for m in (model, stock):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to=[],
            disable_tqdm=True,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=2,
            save_strategy="no",
            remove_unused_columns=False,
            optim="sgd",
            learning_rate=0.1,
        )
        trainer = Trainer(model=m, args=args, train_dataset=rows, data_collator=collate)
        assert trainer.model_accepts_loss_kwargs and trainer._loss_shifts_labels
        trainer.train()
    for (name, p), q in zip(model.state_dict().items(), stock.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
def test_gradient_checkpointing_is_exact_with_the_job_patches(kind):
    """`--gradient-checkpointing` (the Trainer's activation checkpointing, non-reentrant) over the job's attention,
    GELU and chunked-loss patches: every block runs again in the backward, and three AdamW steps give the same
    losses and weights, bit for bit, as without it."""
    cfg = RunConfig(preset="tiny", attention=kind, gradient_checkpointing=True)
    args = run_training_arguments(cfg, use_cpu=True)
    assert args["activation_checkpointing"] is True
    plain = tiny_bloom().train()
    apply_patches(plain, model_patches(cfg, "cpu"))
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(
        activation_checkpointing_kwargs=args["activation_checkpointing_kwargs"]
    )
    attention_calls = []
    for block in checkpointed.transformer.h:
        block.self_attention.register_forward_pre_hook(lambda *_: attention_calls.append(1))
    ids = torch.randint(4, 96, (2, 24))
    ids[0, 10] = 2  # an eos: two documents in the first row
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    losses = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(3):
            loss = model(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert len(attention_calls) == 3 * 2 * len(checkpointed.transformer.h)  # each step: forward + recompute
    assert losses["checkpointed"] == losses["plain"]
    for (name, p), q in zip(checkpointed.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------------------------- build_model
def test_build_tiny_preset(tiny_tokenizer):
    tok = tiny_tokenizer
    model = build_model(RunConfig(preset="tiny"), tok)
    config = model.config
    assert isinstance(model, BloomForCausalLM)
    assert config.vocab_size % 64 == 0 and len(tok) <= config.vocab_size < len(tok) + 64
    assert (config.hidden_size, config.n_layer, config.n_head) == (128, 4, 4)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id, config.unk_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
        tok.unk_token_id,
    )
    assert config.eos_token_id != config.pad_token_id
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert parameter_count(model) == expected_parameters(config.vocab_size, 128, 4)
    assert model.job_attention == "sdpa"  # auto on CPU


@pytest.mark.parametrize(
    ("preset", "vocab", "parameters"),
    [  # the Bloom-zh family's config.json files and model cards (tied embeddings)
        ("bloom-389m-zh", 42437, 345.8e6),
        ("bloom-800m-zh", 46145, 750.8e6),
        ("bloom-1b4-zh", 46145, 1.303e9),
        ("bloom-2b5-zh", 46145, 2.478e9),
        ("bloom-6b4-zh", 46145, 6.230e9),
    ],
)
def test_bloom_zh_presets_match_the_family(preset, vocab, parameters):
    config = model_config(RunConfig(preset=preset), 8000)  # the built-in tokenizer fits: the family's vocabulary
    assert config.vocab_size == vocab
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id, config.unk_token_id) == (1, 2, 3, 0)
    assert (config.offset_alibi, config.seq_length) == (100, 2048)
    with torch.device("meta"):  # shapes only: no memory
        model = BloomForCausalLM(config)
    assert parameter_count(model) == config_parameter_count(config)
    assert parameter_count(model) / parameters == pytest.approx(1, abs=5e-4)  # the table's 4 significant figures


def test_bloom_389m_zh_shape():
    config = model_config(RunConfig(preset="bloom-389m-zh"), 42437)
    with torch.device("meta"):
        model = BloomForCausalLM(config)
    assert parameter_count(model) == 345_768_960  # Langboat/bloom-389m-zh: 345.8M, tied embeddings
    assert flops_per_token(config, 1024) == pytest.approx(2.377e9, rel=1e-3)  # field notes: 2.38 GFLOP at seq 1024


def test_a_tokenizer_larger_than_the_presets_vocabulary_is_refused():
    with pytest.raises(JobError, match="len\\(tokenizer\\)=50000 > preset bloom-389m-zh's vocabulary 42437"):
        model_config(RunConfig(preset="bloom-389m-zh"), 50000)


def test_flops_per_token_counts_the_tied_head_once():
    for tied in (True, False):
        model = tiny_bloom(tie_word_embeddings=tied)
        c = model.config
        assert config_parameter_count(c) == parameter_count(model)
        assert flops_per_token(c, 32) == 6 * parameter_count(model) + 12 * c.n_layer * c.hidden_size * 32


def saved_tiny(tmp_path, vocab: int = 128):
    folder = tmp_path / "model"
    tiny_bloom(vocab=vocab).save_pretrained(folder)
    return folder


def test_build_loads_a_saved_folder(tmp_path):
    folder = saved_tiny(tmp_path)
    model = build_model(RunConfig(model=str(folder), attention="auto"), StandInTokenizer(100))
    stock = AutoModelForCausalLM.from_pretrained(folder)
    assert model.job_attention == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    for (name, p), q in zip(model.state_dict().items(), stock.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_saved_after_install_reloads_in_stock_transformers(tmp_path):
    model = build_model(RunConfig(preset="tiny"), StandInTokenizer(100))
    ids = torch.randint(4, 100, (2, 16))
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # weights that differ from the initialisation
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == ["BloomForCausalLM"] and saved["model_type"] == "bloom"
    assert "auto_map" not in saved and not any(k.startswith("job") for k in saved)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(stock) is BloomForCausalLM and "forward" not in stock.__dict__
    for (name, p), q in zip(model.state_dict().items(), stock.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    model.eval()
    stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=1e-5, rtol=1e-4)


def test_generation_after_build_equals_stock():
    model = build_model(RunConfig(preset="tiny"), StandInTokenizer(100)).eval()
    stock = BloomForCausalLM(model.config).eval()
    stock.load_state_dict(model.state_dict())
    prompt = torch.randint(4, 100, (2, 5))
    kwargs = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=PAD
    )
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **kwargs), stock.generate(prompt, **kwargs))


def test_undo_patches_gives_back_the_stock_model_paths():
    """The bench's baseline: after `undo_patches` the built model runs transformers' own attention and loss."""
    model = build_model(RunConfig(preset="tiny"), StandInTokenizer(100))
    stock = BloomForCausalLM(model.config)
    stock.load_state_dict(model.state_dict())
    ids = torch.randint(4, 100, (2, 16))
    ids[0, 7] = EOS  # packed: the fast path would split row 0 into two documents, the stock path does not
    assert model(ids, labels=ids).logits is None  # the chunked loss
    undo_patches(model)
    assert model.job_attention == "eager" and "forward" not in model.__dict__
    assert "forward" not in model.transformer.__dict__
    out, ref = model(ids, labels=ids), stock(ids, labels=ids)
    assert out.logits is not None
    torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------- errors
def build_error(tmp_path, folder, tokenizer_size: int = 100, **cfg) -> str:
    with pytest.raises(JobError) as info:
        build_model(RunConfig(model=str(folder), **cfg), StandInTokenizer(tokenizer_size))
    message = str(info.value)
    assert "\n" not in message and info.value.fix
    return message


def test_error_missing_folder(tmp_path):
    assert "does not exist" in build_error(tmp_path, tmp_path / "nope")


def test_error_missing_config(tmp_path):
    (tmp_path / "m").mkdir()
    assert "config.json is missing" in build_error(tmp_path, tmp_path / "m")


def test_error_broken_config(tmp_path):
    folder = saved_tiny(tmp_path)
    (folder / "config.json").write_text('{"model_type": "bloom",', encoding="utf-8")
    assert "not valid JSON" in build_error(tmp_path, folder)


def test_error_not_a_bloom_config(tmp_path):
    folder = saved_tiny(tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 100}), encoding="utf-8")
    assert "not a Bloom causal LM config" in build_error(tmp_path, folder)
    (folder / "config.json").write_text("[1, 2]", encoding="utf-8")
    assert "not a config object" in build_error(tmp_path, folder)


def test_error_tokenizer_larger_than_model_vocab(tmp_path):
    folder = saved_tiny(tmp_path, vocab=64)
    assert "len(tokenizer)=100 > model vocab 64" in build_error(tmp_path, folder, tokenizer_size=100)


def test_error_no_weights(tmp_path):
    folder = saved_tiny(tmp_path)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    assert "has no weights" in build_error(tmp_path, folder)


def test_error_flex_on_cpu(tmp_path):
    assert "no backward" in build_error(tmp_path, saved_tiny(tmp_path), attention="flex", device="cpu")


# ------------------------------------------------------------------------------------------------------ patches
def test_fused_gelu_is_bloom_gelu():
    """F.gelu(approximate="tanh") is BloomGelu's function: forward and gradient equal at the suite's tolerances."""
    from transformers.models.bloom.modeling_bloom import BloomGelu

    x = (torch.randn(4096, dtype=torch.float64) * 4).float().requires_grad_()
    y = x.detach().clone().requires_grad_()
    gelu = BloomGelu()
    want = gelu(x)
    FusedGeluPatch().install(torch.nn.Sequential(gelu))
    got = gelu(y)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    want.backward(torch.ones_like(want))
    got.backward(torch.ones_like(got))
    torch.testing.assert_close(y.grad, x.grad, atol=1e-5, rtol=1e-4)


def test_install_patches_logs_what_it_installed_and_print_shows_it(caplog):
    """One function installs the patches; the log and `print(model)` say which; the saved weights stay stock."""
    with caplog.at_level("INFO", logger="job"):
        model = build_model(RunConfig(preset="tiny"), StandInTokenizer(100))
    assert set(model.job_patches) == {"attention", "gelu", "loss"}
    assert model.job_patches["attention"] == "sdpa" and model.job_patches["loss"].startswith("chunked")  # no liger
    assert "model patches: attention sdpa" in caplog.text
    assert repr(model).splitlines()[1].strip().startswith("job patches: attention sdpa; gelu F.gelu(tanh) in 4 MLPs")
    assert all("gelu_impl" in k or "orig_mod" not in k for k in model.state_dict())
    plain = build_model(RunConfig(preset="tiny", fused_gelu=False, liger_loss=False), StandInTokenizer(100))
    assert "gelu" not in plain.job_patches and "job patches: attention sdpa; loss chunked" in repr(plain)


def test_a_patch_refuses_a_transformers_release_it_was_not_written_for(monkeypatch, caplog):
    """Attention and loss re-implement transformers internals: on another release they are not installed, the log
    says why and which stock path runs, and the model then computes exactly what stock transformers does."""
    from job.model import patches

    monkeypatch.setattr(patches, "version", lambda name: "9.0.0")
    with caplog.at_level("INFO", logger="job"):
        model = build_model(RunConfig(preset="tiny"), StandInTokenizer(100))
    assert set(model.job_patches) == {"gelu"}  # the one that replaces no internals
    assert (
        f"model patch attention not installed (written for transformers {patches.BLOOM_INTERNALS}, this is 9.0.0)"
        in (caplog.text)
    )
    assert "transformers' eager attention runs" in caplog.text and "transformers' full-logits loss runs" in caplog.text
    stock = BloomForCausalLM(model.config)
    stock.load_state_dict(model.state_dict())
    ids = torch.randint(4, 100, (2, 16))
    torch.testing.assert_close(model(ids, labels=ids).loss, stock(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)


def test_patches_install_in_order_and_undo_in_reverse():
    cfg = RunConfig(preset="tiny", compile_blocks=True)
    assert [p.name for p in model_patches(cfg, "cpu")] == ["attention", "gelu", "loss", "compile"]
    assert [p.name for p in model_patches(RunConfig(fused_gelu=False), "cpu")] == ["attention", "loss"]
    with pytest.raises(JobError, match="flex cannot train on cpu"):
        model_patches(RunConfig(attention="flex"), "cpu")
    model = build_model(cfg, StandInTokenizer(100))
    assert all(block._compiled_call_impl is not None for block in model.transformer.h)
    undo_patches(model)
    assert model.job_patches == {} and "job patches" not in repr(model)
    assert all(block._compiled_call_impl is None for block in model.transformer.h)
    assert "forward" not in model.__dict__ and "forward" not in model.transformer.__dict__


def test_compiled_blocks_save_a_plain_hf_bloom(tmp_path):
    """Regional compilation is in place (`Module.compile`): the saved folder loads in stock transformers with the
    same tensors (compiling itself happens at the first forward, on the GPU in tests/test_model.py's CUDA test)."""
    model = build_model(RunConfig(preset="tiny", compile_blocks=True), StandInTokenizer(100))
    assert model.job_patches["compile"] == "each of 4 BloomBlocks (dynamic=False)"
    model.save_pretrained(str(tmp_path))
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(stock) is BloomForCausalLM and "job patches" not in repr(stock)
    for (name, p), q in zip(model.state_dict().items(), stock.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.slow  # inductor's C++ compile: a minute and more on a small CPU
def test_compiled_blocks_train_like_uncompiled_ones_with_inductor_on_cpu():
    """--compile-blocks on a CPU: inductor compiles each BloomBlock (C++ through the system compiler), with
    --gradient-checkpointing too; three AdamW steps give the uncompiled model's losses and weights (fp32)."""
    tokenizer = StandInTokenizer(100)
    plain = build_model(RunConfig(preset="tiny"), tokenizer)
    compiled = build_model(RunConfig(preset="tiny", compile_blocks=True), tokenizer)
    compiled.load_state_dict(plain.state_dict())
    compiled.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(4, 100, (2, 32))
    losses = {}
    for name, model in (("plain", plain), ("compiled", compiled)):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(3):
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["compiled"] == pytest.approx(losses["plain"], rel=1e-5)
    for (name, p), q in zip(compiled.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
    assert all(block._compiled_call_impl is not None for block in compiled.transformer.h)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("flex_compile_mode", "turbo", "--flex-compile-mode .turbo. is not one of"),
        ("flex_kernel_options", "[1]", "JSON object"),
    ],
)
def test_flex_settings_are_checked_before_anything_runs(field, value, message):
    with pytest.raises(JobError, match=message):
        RunConfig.load(**{field: value})


LIGER_UNDER_THE_INTERPRETER = """
import copy, torch
from job.model.loss import install_chunked_loss
from tests.conftest import tiny_bloom
chunked = tiny_bloom(vocab=300).train()
liger = copy.deepcopy(chunked)
install_chunked_loss(chunked, chunk_tokens=16)
install_chunked_loss(liger, loss="liger")
ids = torch.randint(4, 300, (2, 24))
labels = ids.masked_fill(torch.rand(ids.shape) < 0.2, -100)
losses = [m(ids, labels=labels).loss for m in (chunked, liger)]
torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
for loss in losses:
    loss.backward()
for (name, p), q in zip(liger.named_parameters(), chunked.parameters(), strict=True):
    torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
print("liger equals chunked")
"""


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("liger_kernel", "triton")), reason="liger-kernel and triton"
)
def test_liger_loss_equals_chunked_loss_under_the_triton_interpreter():
    """liger's Triton kernels on a CPU through Triton's interpreter (TRITON_INTERPRET=1, read when triton is
    imported: a fresh process): the job's liger path gives the chunked loss and its gradients."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    pythonpath = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": pythonpath}
    done = subprocess.run(
        [sys.executable, "-c", LIGER_UNDER_THE_INTERPRETER], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "liger equals chunked" in done.stdout, done.stderr[-3000:]


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
def test_liger_loss_equals_chunked_loss_on_cuda():
    """liger-kernel's fused linear + cross-entropy gives the chunked loss's value and gradients (fp32, TF32 off)."""
    pytest.importorskip("liger_kernel")
    torch.backends.cuda.matmul.allow_tf32 = False
    chunked = tiny_bloom(vocab=4096).cuda().train()
    liger = copy.deepcopy(chunked)
    install_chunked_loss(chunked, chunk_tokens=16)
    install_chunked_loss(liger, loss="liger")
    ids = torch.randint(4, 4096, (2, 64), device="cuda")
    labels = ids.masked_fill(torch.rand(ids.shape, device="cuda") < 0.2, -100)
    items = torch.tensor(int((labels[..., 1:] != -100).sum()) * 2, device="cuda")
    losses = [m(ids, labels=labels, num_items_in_batch=items).loss for m in (chunked, liger)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(liger.named_parameters(), chunked.parameters(), strict=True):
        error = (p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
        assert error < 1e-3, f"{name}: relative gradient error {error:.2e}"


@cuda_only
def test_all_patches_with_compiled_blocks_train_like_stock_on_cuda():
    """flex + fused GELU + liger (if there) + compiled blocks, bf16 autocast: the loss after 3 AdamW steps stays
    within 2% of the stock model's, and the state dict keeps stock names (the export is a plain HF Bloom)."""
    tokenizer = StandInTokenizer(1000)
    model = build_model(RunConfig(preset="tiny", compile_blocks=True), tokenizer, "cuda").cuda()
    assert "compile" in model.job_patches and model.job_patches["attention"] == "flex"
    assert set(model.state_dict()) == set(BloomForCausalLM(model.config).state_dict())
    stock = BloomForCausalLM(model.config).cuda()
    stock.load_state_dict(model.state_dict())
    ids = torch.randint(4, 1000, (4, 256), device="cuda")
    losses = []
    for m in (stock, model):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
