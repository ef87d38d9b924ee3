"""Generation: left-padded batches equal one-by-one, eos and the token limit stop it, a seed repeats;
the smoke test passes on a saved tiny model and refuses broken folders."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from job.core.errors import JobError
from job.model.generate import SMOKE_PROMPTS, generate, generate_ids, load_for_inference, smoke
from tests.conftest import tiny_bloom

# Different lengths on purpose: a batch of them needs padding.
PROMPTS = ["北京", "下面是一则新闻，中国的经济发展很快，", "今天", "人民日报社论指出"]
LIMIT = 12


def _tiny_bloom(tokenizer, seed: int = 0):
    # a wide init: a default-init tiny Bloom only repeats the last prompt token, which would test little
    return tiny_bloom(len(tokenizer), seed, initializer_range=1.0).eval()


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return _tiny_bloom(tiny_tokenizer)


@pytest.fixture(scope="module")
def eos_model(tiny_tokenizer):
    """A tiny Bloom that ends some continuations early: a token its greedy output uses in some prompts but not all
    trades its (tied) embedding row with eos's, so the model now says eos where it said that token."""
    model = _tiny_bloom(tiny_tokenizer)
    prompt_ids = {i for p in PROMPTS for i in tiny_tokenizer(p, add_special_tokens=False)["input_ids"]}
    outs = [o["ids"] for o in generate_ids(model, tiny_tokenizer, PROMPTS, max_new_tokens=LIMIT)]
    pick = None
    for position in range(1, LIMIT // 2):
        for out in outs:
            token = out[position] if position < len(out) else None
            if (
                token is not None
                and token not in prompt_ids
                and token > 3
                and sum(token in o[: LIMIT - 1] for o in outs) < len(outs)
            ):
                pick = token
                break
        if pick is not None:
            break
    assert pick is not None, "no token to swap with eos in this random model"
    eos = tiny_tokenizer.eos_token_id
    with torch.no_grad():
        weight = model.transformer.word_embeddings.weight
        weight[[pick, eos]] = weight[[eos, pick]]
    return model


def test_batched_greedy_equals_one_by_one_with_left_padding(model, tiny_tokenizer):
    right = copy.copy(tiny_tokenizer)
    right.padding_side = "right"  # generate must pad on the left whatever the tokenizer says
    batched = generate(model, right, PROMPTS, max_new_tokens=LIMIT)
    assert right.padding_side == "right"
    for prompt, out in zip(PROMPTS, batched, strict=True):
        alone = generate(model, tiny_tokenizer, [prompt], max_new_tokens=LIMIT)[0]
        assert out == alone
        assert out["prompt"] == prompt and out["text"]
        assert out["new_tokens"] == LIMIT or (out["stopped_at_eos"] and out["new_tokens"] < LIMIT)
    # smaller batches than prompts: same result
    assert generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=LIMIT, batch_size=3) == batched


def test_stops_at_eos_and_respects_the_limit(eos_model, tiny_tokenizer):
    outs = generate(eos_model, tiny_tokenizer, PROMPTS, max_new_tokens=LIMIT)
    stopped = [o for o in outs if o["stopped_at_eos"]]
    running = [o for o in outs if not o["stopped_at_eos"]]
    assert stopped and running, outs  # one batch holds both: rows after their eos are padding
    for o in stopped:
        assert 1 <= o["new_tokens"] < LIMIT and "</s>" not in o["text"] and "<pad>" not in o["text"]
    for o in running:
        assert o["new_tokens"] == LIMIT
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert generate(eos_model, tiny_tokenizer, [prompt], max_new_tokens=LIMIT)[0] == out
    short = generate(eos_model, tiny_tokenizer, PROMPTS, max_new_tokens=3)
    assert all(o["new_tokens"] <= 3 for o in short)


def test_sampling_with_a_seed_repeats_and_leaves_the_global_rng_alone(model, tiny_tokenizer):
    state = torch.get_rng_state()
    first = generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=LIMIT, greedy=False, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    again = generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=LIMIT, greedy=False, seed=7)
    other = generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=LIMIT, greedy=False, seed=8)
    assert first == again
    assert [o["text"] for o in first] != [o["text"] for o in other]
    greedy = generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=LIMIT)
    assert [o["text"] for o in first] != [o["text"] for o in greedy]


def test_empty_prompt_and_training_mode_restored(model, tiny_tokenizer):
    model.train()
    out = generate(model, tiny_tokenizer, ["", "北京"], max_new_tokens=4)
    assert model.training
    model.eval()
    assert out[0]["new_tokens"] == 4 and out[1] == generate(model, tiny_tokenizer, ["北京"], max_new_tokens=4)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("saved") / "final"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_smoke_on_a_saved_model(saved):
    result = smoke(str(saved), max_new_tokens=8)
    assert result["ok"], result
    assert set(result["checks"]) >= {
        "non_empty",
        "stops_at_eos_or_limit",
        "seeded_sample_repeats",
        "batched_equals_single",
        "finite_logits",
    }
    assert [s["prompt"] for s in result["samples"]] == SMOKE_PROMPTS
    assert all(isinstance(v, bool) for v in result["checks"].values()) and result["notes"] == []
    assert result["parameters"] > 0 and result["dtype"] == "float32" and result["device"] == "cpu"


def test_load_for_inference_is_stock_and_in_eval_mode(saved):
    lm, tok = load_for_inference(saved)
    assert not lm.training and type(lm).__name__ == "BloomForCausalLM" and tok.eos_token_id == 2


def test_broken_folders_are_job_errors(tmp_path, saved):
    with pytest.raises(JobError, match="does not exist"):
        smoke(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(JobError, match=r"no config\.json"):
        smoke(str(empty))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(saved, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(JobError, match="could not be loaded"):
        load_for_inference(no_weights)


def test_near_ties_are_told_apart_from_real_differences():
    from job.model.generate import _first_difference, _near_tie

    assert _first_difference([1, 2, 3], [1, 2, 3]) is None
    assert _first_difference([1, 2, 3], [1, 5, 3]) == 1
    scores = torch.zeros(10)
    scores[4], scores[6] = 5.0, 4.9
    batched = {"ids": [1, 4], "scores": [torch.zeros(10), scores]}
    assert _near_tie(batched, {"ids": [1, 6]}, 1, torch.bfloat16) == pytest.approx(0.1)  # bf16 rounding
    assert _near_tie(batched, {"ids": [1, 6]}, 1, torch.float32) is None  # too wide for fp32
    assert _near_tie(batched, {"ids": [1, 7]}, 1, torch.bfloat16) is None  # a margin of 5: a real bug


def test_prompts_file_reads_a_bom_and_refuses_other_encodings(tmp_path):
    from job.model.generate import read_prompts

    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "北京\n今天\n".encode())
    assert read_prompts(tmp_path / "bom.txt") == ["北京", "今天"]
    (tmp_path / "gbk.txt").write_bytes("北京\n".encode("gbk"))
    with pytest.raises(JobError, match="is not UTF-8 text"):
        read_prompts(tmp_path / "gbk.txt")


def test_reading_samples_repeat_exactly_and_do_not_loop_as_greedy_does(tiny_tokenizer):
    """What a person reads (train's samples, the report, `generate` without flags): seeded sampling with a repetition
    penalty. A default-init Bloom is the degenerate case: greedy repeats one token ("北京北京北京…")."""
    from job.model.sampling import READING_SAMPLES

    degenerate = tiny_bloom(len(tiny_tokenizer)).eval()
    greedy = generate_ids(degenerate, tiny_tokenizer, PROMPTS, max_new_tokens=24)
    assert all(len(set(o["ids"])) == 1 for o in greedy)  # the premise
    reading = generate_ids(degenerate, tiny_tokenizer, PROMPTS, max_new_tokens=24, **READING_SAMPLES)
    assert reading == generate_ids(degenerate, tiny_tokenizer, PROMPTS, max_new_tokens=24, **READING_SAMPLES)
    assert all(len(set(o["ids"])) > len(o["ids"]) // 2 for o in reading), reading


def test_the_repetition_penalty_reaches_the_logits(model, tiny_tokenizer):
    prompt = PROMPTS[1]
    seen = set(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    (plain,) = generate_ids(model, tiny_tokenizer, [prompt], max_new_tokens=1, with_scores=True)
    (penalised,) = generate_ids(
        model, tiny_tokenizer, [prompt], max_new_tokens=1, with_scores=True, repetition_penalty=1.3
    )
    raw, scores = plain["scores"][0], penalised["scores"][0]
    for token in range(len(raw)):
        expected = (raw[token] / 1.3 if raw[token] > 0 else raw[token] * 1.3) if token in seen else raw[token]
        assert scores[token] == pytest.approx(float(expected), rel=1e-5, abs=1e-5), token
    with pytest.raises(JobError, match="repetition penalty 0"):
        generate_ids(model, tiny_tokenizer, [prompt], repetition_penalty=0)


def test_a_prompt_longer_than_the_context_is_one_line_before_any_allocation(saved, tmp_path):
    """200,000 characters (what once asked eager attention for a 24 GB mask): refused in one line, exit 2, and the
    process never grows past a few GB."""
    import os
    import subprocess
    import sys
    import threading

    from tests.conftest import REPO

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("北京是中华人民共和国的首都。" * 14_286 + "\n", encoding="utf-8")  # 200,004 characters
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", "generate", "--model", str(saved), "--prompts-file", str(prompts)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    watchdog = threading.Timer(300, proc.kill)  # a hang fails the test instead of stalling the suite
    watchdog.start()
    try:
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
    finally:
        watchdog.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr = stderr
    peak_gib = usage.ru_maxrss / 2**20  # kB on Linux
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: prompt 1 is ") and "longer than the model's context of 2,048 tokens" in line
    assert peak_gib < 4, peak_gib


def test_the_context_is_the_models_own_when_it_names_one(model, tiny_tokenizer):
    from job.model.generate import context_tokens

    assert context_tokens(model, tiny_tokenizer) == 2048  # none named: BLOOM's
    named = copy.deepcopy(model)
    named.config.seq_length = 16
    assert context_tokens(named, tiny_tokenizer) == 16
    with pytest.raises(JobError, match=r"prompt 2 is .* longer than the model's context of 16 tokens"):
        generate(named, tiny_tokenizer, ["北京", "这是一篇比较长的文章，" * 10], max_new_tokens=2)
