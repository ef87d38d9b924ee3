"""Generation (batched, left-padded, seeded) and the smoke test of an exported model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from job.core.errors import JobError
from job.core.logs import adopt_library_loggers
from job.model.sampling import Sampling

SMOKE_PROMPTS = ["下面是一则娱乐新闻，", "中国的首都是", "今天天气"]


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _special_ids(tokenizer, model) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(model.generation_config, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    if eos is None:
        raise JobError(
            "the tokenizer has no eos token, so generation cannot stop", "set eos_token in its tokenizer_config.json"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(eos), int(pad)


# The context of a model that names none: BLOOM's training context (its config's `seq_length`). ALiBi has no position
# table to run out of, but eager attention's mask grows with the square of the length: a 130k-token prompt asks for
# tens of GB, so a longer prompt is refused, not attempted.
DEFAULT_CONTEXT_TOKENS = 2048


def context_tokens(model, tokenizer) -> int:
    """The longest prompt the model takes: its config's context (`seq_length`, `max_position_embeddings`,
    `n_positions`), else the tokenizer's `model_max_length` when it is a real figure, else BLOOM's 2048."""
    for name in ("seq_length", "max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**6 else DEFAULT_CONTEXT_TOKENS  # 1e30: "none set"


def check_prompt_lengths(encoded: list[list[int]], context: int) -> None:
    """One line for a prompt longer than the model's context, before anything is allocated for it."""
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i]), default=None)
    if longest is not None and len(encoded[longest]) > context:
        raise JobError(
            f"prompt {longest + 1} is {len(encoded[longest]):,} tokens, longer than the model's context of "
            f"{context:,} tokens",
            "shorten it (the end of a text is what a continuation follows on)",
        )


def generate_ids(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    with_scores: bool = False,
    **sampling,
) -> list[dict[str, Any]]:
    """Per prompt: `ids` (the new tokens up to and including a first eos) and `stopped_at_eos`; with
    `with_scores`, also `scores` (the processed next-token logits at each new position, float32 on CPU).
    `sampling`: the fields of `job.model.sampling.Sampling` to change (default: greedy).

    Left padding with the attention mask (Bloom's ALiBi reads positions from the mask, so a right-padded or
    unmasked batch changes outputs); no special tokens added (training documents have no bos); the global RNG is
    seeded inside `fork_rng`, so a caller's random state (a training run's) is left as it was.
    """
    draw = Sampling(**sampling)
    greedy, temperature, repetition_penalty = draw.greedy, draw.temperature, draw.repetition_penalty
    if max_new_tokens < 1:
        raise JobError(f"max_new_tokens {max_new_tokens} must be at least 1", "use e.g. 64")
    if not greedy and temperature <= 0:
        raise JobError(f"temperature {temperature} must be above 0 when sampling", "use greedy or a positive value")
    if repetition_penalty <= 0:
        raise JobError(f"repetition penalty {repetition_penalty} must be above 0", "use 1.0 (none) or e.g. 1.3")
    eos, pad = _special_ids(tokenizer, model)
    device = _device_of(model)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] or [eos] for p in prompts]  # "": a new document
    check_prompt_lengths(encoded, context_tokens(model, tokenizer))
    how = {} if greedy else {"top_k": draw.top_k, "top_p": draw.top_p, "temperature": temperature}
    results: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
            torch.manual_seed(draw.seed)
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
                attention_mask = torch.tensor(
                    [[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device
                )
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=0,
                    do_sample=not greedy,
                    num_beams=1,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    use_cache=True,
                    return_dict_in_generate=True,
                    output_scores=with_scores,
                    repetition_penalty=repetition_penalty,
                    **how,
                )
                new = out.sequences[:, width:].tolist()
                for row, tokens in enumerate(new):
                    stopped = eos in tokens
                    kept = tokens[: tokens.index(eos) + 1] if stopped else tokens
                    item: dict[str, Any] = {"ids": kept, "stopped_at_eos": stopped}
                    if with_scores:
                        item["scores"] = [s[row].float().cpu() for s in out.scores[: len(kept)]]
                    results.append(item)
    finally:
        model.train(was_training)
    return results


def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16, **sampling
) -> list[dict]:
    """Continuations of `prompts`: [{"prompt", "text", "new_tokens", "stopped_at_eos"}], in order; `sampling` as
    `generate_ids` takes it.

    `text` is the continuation alone, decoded with special tokens skipped; `new_tokens` counts the generated
    tokens, the stopping eos included. A fixed seed repeats its text (same prompts, batch size and device).
    """
    outs = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, **sampling)
    return [
        {
            "prompt": p,
            "text": tokenizer.decode(o["ids"], skip_special_tokens=True),
            "new_tokens": len(o["ids"]),
            "stopped_at_eos": o["stopped_at_eos"],
        }
        for p, o in zip(prompts, outs, strict=True)
    ]


def load_for_inference(model_dir: str | Path):
    """(model, tokenizer) from an HF folder with stock transformers: eval mode, CUDA bf16 if there, else CPU fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_dir)
    if not folder.is_dir():
        raise JobError(f"model folder {folder} does not exist", "pass an HF model folder, e.g. OUTPUT/final")
    if not (folder / "config.json").is_file():
        raise JobError(
            f"{folder} has no config.json, so it is not an HF model folder",
            "pass the folder a training run exported (OUTPUT/final) or a saved HF model",
        )
    from job.core.weights import check_weights

    check_weights(folder)  # a truncated or corrupt file: one line, not a safetensors traceback
    adopt_library_loggers()  # no loading bars on stderr
    cuda = torch.cuda.is_available()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.bfloat16 if cuda else torch.float32, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as e:
        raise JobError(
            f"{folder} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            "check that it holds the weights (*.safetensors) and the tokenizer files",
        ) from None
    model.to("cuda" if cuda else "cpu").eval()
    return model, tokenizer


def read_prompts(path: Path) -> list[str]:
    """One prompt per line of a UTF-8 file (a BOM is read)."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise JobError(
            f"--prompts-file {path} is not UTF-8 text (byte {e.start})",
            "re-encode it as UTF-8 (e.g. iconv -f GB18030 -t UTF-8)",
        ) from None


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _near_tie(batched: dict, single: dict, position: int, dtype: torch.dtype) -> float | None:
    """The logit margin where batched and one-by-one greedy part, if it is within the dtype's rounding."""
    if position >= len(batched["ids"]) or position >= len(single["ids"]):
        return None
    scores = batched["scores"][position]
    margin = float(scores[batched["ids"][position]] - scores[single["ids"][position]])
    tolerance = 1e-3 if dtype == torch.float32 else 0.25  # bf16 keeps ~3 significant digits of a logit
    return margin if abs(margin) <= tolerance else None


def smoke(model_dir: str, max_new_tokens: int = 32, seed: int = 1234) -> dict:
    """Reload `model_dir` and check its generations: non-empty text, stopping at eos or exactly at the limit,
    a seeded sample that repeats, and batched (left-padded) greedy equal to one-by-one greedy.

    Returns {"ok", "checks" (name -> bool), "notes", "samples", "model", "parameters", "device", "dtype", ...};
    raises JobError for a missing or broken folder. Batched and one-by-one greedy may part at a near-tie of two
    logits on a bf16 GPU (different batch shapes round differently): that passes and is explained in `notes`.
    """
    model, tokenizer = load_for_inference(model_dir)
    dtype = next(model.parameters()).dtype
    prompts = list(SMOKE_PROMPTS)
    kwargs = {"max_new_tokens": max_new_tokens}
    batched = generate_ids(model, tokenizer, prompts, greedy=True, with_scores=True, **kwargs)
    single = [generate_ids(model, tokenizer, [p], greedy=True, **kwargs)[0] for p in prompts]
    sampled = generate_ids(model, tokenizer, prompts, greedy=False, seed=seed, **kwargs)
    again = generate_ids(model, tokenizer, prompts, greedy=False, seed=seed, **kwargs)

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    texts = [decode(o["ids"]) for o in batched]
    sample_texts = [decode(o["ids"]) for o in sampled]
    notes: list[str] = []
    batch_ok = True
    for prompt, b, s in zip(prompts, batched, single, strict=True):
        at = _first_difference(b["ids"], s["ids"])
        if at is None:
            continue
        margin = _near_tie(b, s, at, dtype)
        if margin is None:
            batch_ok = False
            notes.append(f"{prompt!r}: batched and single greedy differ at new token {at}")
        else:
            notes.append(
                f"{prompt!r}: batched and single greedy part at new token {at}, a near-tie "
                f"(logit margin {margin:.2e} in {str(dtype).replace('torch.', '')})"
            )

    def within_limit(o: dict) -> bool:
        n = len(o["ids"])
        return n <= max_new_tokens and (o["stopped_at_eos"] or n == max_new_tokens)

    checks: dict[str, Any] = {
        "non_empty": all(t.strip() for t in texts + sample_texts),
        "stops_at_eos_or_limit": all(within_limit(o) for o in batched + single + sampled + again),
        "seeded_sample_repeats": [o["ids"] for o in sampled] == [o["ids"] for o in again],
        "batched_equals_single": batch_ok,
        "finite_logits": all(bool(torch.isfinite(s.max())) for o in batched for s in o["scores"]),
    }
    ok = all(checks.values())
    samples = [
        {
            "prompt": p,
            "greedy": t,
            "sampled": st,
            "greedy_new_tokens": len(b["ids"]),
            "greedy_stopped_at_eos": b["stopped_at_eos"],
        }
        for p, t, st, b in zip(prompts, texts, sample_texts, batched, strict=True)
    ]
    return {
        "ok": ok,
        "checks": checks,
        "notes": notes,
        "samples": samples,
        "model": str(model_dir),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(_device_of(model)),
        "dtype": str(dtype).replace("torch.", ""),
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }
