"""A weighted data mix (job/core/data_spec.py, job/data/mix.py): the `--data`/`--prepared` syntax and its refusals, the
interleaving by weight and seed, and whole CPU runs on a mix: per-source held-out metrics in metrics.jsonl, the report
and the model card, a SIGTERM mid-epoch that resumes to the very same curve, and a changed mix that refuses to
resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.core.config import RunConfig, comparable
from job.core.data_spec import Source, format_mix, parse_mix, probabilities
from job.core.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, JobError
from tests.conftest import REPO, tiny_bloom, train_args, write_jsonl


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def job(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "job", *args], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=timeout
    )


# --------------------------------------------------------------------------------------------------- syntax
def test_a_mix_parses_in_order_and_one_path_stays_one_source():
    mix = parse_mix(" 0.8:wiki=/data/wiki.jsonl, 0.2:replay=org/replay ")
    assert mix == [Source("wiki", 0.8, "/data/wiki.jsonl"), Source("replay", 0.2, "org/replay")]
    assert probabilities(parse_mix("4:a=x,1:b=y")) == [0.8, 0.2]
    assert parse_mix(format_mix(mix)) == mix
    exact = parse_mix("0.1234567891:a=x,4:b=y,1e-2:c=z")
    assert parse_mix(format_mix(exact)) == exact and format_mix(exact) == "0.1234567891:a=x,4:b=y,0.01:c=z"
    for single in (None, "/data/wiki.jsonl", "org/dataset", "data/*.parquet", "./a=b.jsonl", "docs.jsonl"):
        assert parse_mix(single) is None  # exactly today's --data
    # the same mix written otherwise (relative weights, a trailing slash) is the same run
    assert comparable("data", "0.8:a=/tmp,0.2:b=hub/x") == comparable("data", "4:a=/tmp/,1:b=hub/x")
    assert comparable("data", "0.8:a=/tmp,0.2:b=hub/x") != comparable("data", "0.7:a=/tmp,0.3:b=hub/x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0:a=x,1:b=y", "--data weight '0' of source 'a' is not a positive number"),
        ("-0.5:a=x,1:b=y", "weight '-0.5' of source 'a' is not a positive number"),
        ("nan:a=x,1:b=y", "weight 'nan' of source 'a' is not a positive number"),
        ("1:a=x,inf:b=y", "weight 'inf' of source 'b' is not a positive number"),
        ("lots:a=x,1:b=y", "weight 'lots' of source 'a' is not a positive number"),
        ("1:a=x,1:a=y", "--data names source 'a' twice"),
        ("a=x,b=y", "--data item 'a=x' is not WEIGHT:NAME=PATH"),
        ("1:a=,1:b=y", "--data item '1:a=' is not WEIGHT:NAME=PATH"),
        ("1:a b=x,1:c=y", "--data source name 'a b' is not letters"),
        # an all_exhausted epoch lasts until the rarest source is read whole: the ratio bounds its length
        ("1:a=x,1e-300:b=y", "--data weight of 'a' is 1e\\+300 times that of 'b', more than 1000"),
        ("1001:a=x,1:b=y,2:c=z", "weight of 'a' is 1e\\+03 times that of 'b', more than 1000"),
    ],
)
def test_a_bad_mix_is_refused_when_the_config_loads(text, message):
    with pytest.raises(JobError, match=message.replace("(", r"\(")) as e:
        RunConfig.load(data=text)
    assert e.value.fix  # one line: cause -- fix
    with pytest.raises(JobError, match="--prepared"):
        RunConfig.load(prepared=text)


def test_huge_equal_weights_are_shares_that_sum_to_one():
    """Weights are relative: 1e308 and 1e308 are 50/50 (their sum would overflow to inf)."""
    spec = RunConfig.load(data="1e308:a=x,1e308:b=y").data
    assert spec.probabilities() == [0.5, 0.5]
    assert RunConfig.load(data="1000:a=x,1:b=y").data.probabilities() == pytest.approx([1000 / 1001, 1 / 1001])


def _corpora(root: Path) -> tuple[Path, Path]:
    from job.data.corpus import builtin_articles

    articles = builtin_articles()
    return write_jsonl(root / "news.jsonl", articles[:200]), write_jsonl(root / "replay.jsonl", articles[200:400])


@pytest.mark.parametrize(
    "mix",
    [
        "0:news={news},1:replay={replay}",
        "nan:news={news},1:replay={replay}",
        "1:news={news},1:news={replay}",
        "1:news={news},1:blank={blank}",  # empty after filtering: every text blank
    ],
)
def test_bad_mix_input_exits_2_in_one_line_and_writes_nothing(tmp_path, tiny_tokenizer_dir, job_cache, mix):
    news, replay = _corpora(tmp_path)
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "   "])
    before = sorted(job_cache.rglob("*"))
    output = tmp_path / "run"
    data = mix.format(news=news, replay=replay, blank=blank)
    proc = job("train", "--data", data, "--tokenizer", str(tiny_tokenizer_dir), "--output-dir", str(output))
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " -- " in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    if "blank" in mix:
        assert "source blank:" in lines[0]
    # nothing at all: not even datasets' Arrow conversion of the good source read before the bad one
    assert not output.exists() and sorted(job_cache.rglob("*")) == before


# ------------------------------------------------------------------------------------------- interleaving
@pytest.fixture
def prepared_mix(tmp_path, tiny_tokenizer):
    """Two prepared sources of very different sizes (each its own cache entry), as a `--prepared` mix."""
    from job.data.mix import prepare_mix

    news, replay = _corpora(tmp_path)
    cfg = RunConfig.load(data=f"3:news={news},1:replay={replay}", max_length=32, eval_fraction=0.1)
    prepared, done = prepare_mix(cfg, tiny_tokenizer)
    assert done["news"].path != done["replay"].path
    return prepared, done


def test_each_source_is_prepared_as_a_run_on_it_alone(prepared_mix, tmp_path, tiny_tokenizer):
    from job.data.prepare import prepare

    prepared, done = prepared_mix
    alone = prepare(RunConfig.load(data=str(tmp_path / "news.jsonl"), max_length=32, eval_fraction=0.1), tiny_tokenizer)
    assert alone.cache_hit and alone.path == done["news"].path  # today's cache key, rows and split
    assert list(prepared.sources) == [
        Source("news", 3, str(done["news"].path)),
        Source("replay", 1, str(done["replay"].path)),
    ]


def test_the_training_set_draws_by_weight_with_the_seed(prepared_mix):
    from job.data.mix import load_mix
    from job.data.prepare import load_prepared

    prepared, done = prepared_mix
    first, again, other = (load_mix(prepared, seed, "first_exhausted") for seed in (42, 42, 7))
    assert first["train"]["input_ids"] == again["train"]["input_ids"]  # the same seed: the same rows in order
    assert first["train"]["input_ids"] != other["train"]["input_ids"]
    sources = {name: {tuple(r) for r in load_prepared(str(p.path))["train"]["input_ids"]} for name, p in done.items()}
    drawn = [tuple(r) for r in first["train"]["input_ids"]]
    news = sum(r in sources["news"] for r in drawn)
    assert news + sum(r in sources["replay"] for r in drawn) == len(drawn)
    assert abs(news / len(drawn) - 0.75) < 0.06  # 3:1 by weight (hundreds of rows)
    # an epoch ends when the first source runs out: no row of either source repeats
    sizes = {name: len(load_prepared(str(p.path))["train"]) for name, p in done.items()}  # (rows may repeat in one)
    assert max(news, len(drawn) - news) in sizes.values()
    assert set(first["eval"]) == {"news", "replay"}  # each source's own held-out split
    for name, split in first["eval"].items():
        assert split["input_ids"] == load_prepared(str(done[name].path))["eval"]["input_ids"]
    # until every source has been read whole: every row of each is drawn, the smaller source's again and again
    whole = [tuple(r) for r in load_mix(prepared, 42, "all_exhausted")["train"]["input_ids"]]
    assert {r for r in whole if r in sources["news"]} == sources["news"]
    assert {r for r in whole if r in sources["replay"]} == sources["replay"]
    assert len(whole) > len(drawn) and len(whole) > len(set(whole))
    # weights whose sum overflows a float still draw (datasets refuses shares that do not sum to 1)
    huge = dataclasses.replace(prepared, sources=tuple(dataclasses.replace(s, weight=1e308) for s in prepared.sources))
    assert len(load_mix(huge, 42, "first_exhausted")["train"]) > 0


def test_a_prepared_mix_of_other_layouts_is_refused(prepared_mix, tmp_path, tiny_tokenizer):
    from job.data.prepare import prepare
    from job.run.check_results import Preflight
    from job.run.preflight import check_data

    prepared, _ = prepared_mix
    longer = prepare(RunConfig.load(data=str(tmp_path / "replay.jsonl"), max_length=64), tiny_tokenizer)
    row = check_data(Preflight(RunConfig.load(prepared=prepared)))
    assert row.ok and "news 75%" in row.detail and "replay 25%" in row.detail
    row = check_data(
        Preflight(RunConfig.load(data=f"3:news={tmp_path / 'news.jsonl'},1:replay={tmp_path}/replay.jsonl"))
    )
    assert row.ok and "mix of 2 sources: news 75%" in row.detail and "(200 documents)" in row.detail
    with pytest.raises(JobError, match="source replay: "):
        check_data(Preflight(RunConfig.load(data=f"3:news={tmp_path / 'news.jsonl'},1:replay=nowhere.jsonl")))
    with pytest.raises(JobError, match="different rows"):
        check_data(Preflight(RunConfig.load(prepared=f"{prepared},1:longer={longer.path}")))


# ------------------------------------------------------------------------------------------------- runs
STEPS = 12


def _train_args(inputs: dict, output: Path, mix: str = "0.8:news={news},0.2:replay={replay}", *extra: str):
    """A tiny one-process run of STEPS steps on MIX, held-out loss every 6 steps, TensorBoard on; EXTRA flags last."""
    return [
        *train_args(
            model=inputs["model"],
            tokenizer=inputs["tokenizer"],
            data=mix.format(**inputs),
            output_dir=output,
            nproc=1,
            deepspeed="none",
            device="cpu",
            max_steps=STEPS,
            save_steps=100,
            eval_fraction=0.1,
            eval_steps=6,
            eval_batches=2,
            report_to="tensorboard",
        ),
        *extra,
    ]


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _losses(output: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(output) if "loss" in r}  # a resume appends: later lines win


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("mix")
    tiny_bloom(640, hidden_size=32, n_head=2).save_pretrained(root / "model")
    news, replay = _corpora(root)
    return {"model": root / "model", "tokenizer": tiny_tokenizer_dir, "news": news, "replay": replay, "root": root}


@pytest.fixture(scope="module")
def reference(inputs):
    """The uninterrupted mixed run."""
    output = inputs["root"] / "ref"
    proc = job(*_train_args(inputs, output))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return output


@pytest.mark.slow
def test_each_source_is_evaluated_and_reported(reference):
    records = _records(reference)
    for name in ("news", "replay"):
        evals = [r for r in records if f"eval_{name}_loss" in r]
        assert [r["step"] for r in evals] == [0, 6, 12]
        assert all(math.isclose(r[f"eval_{name}_perplexity"], math.exp(r[f"eval_{name}_loss"])) for r in evals)
    assert not any("eval_loss" in r for r in records)  # one key per source, no merged loss
    report = (reference / "report.md").read_text(encoding="utf-8")
    table = report.split("## Held-out loss by source", 1)[1].split("##", 1)[0]
    assert "| news | 80% |" in table and "| replay | 20% |" in table
    assert (reference / "loss.png").stat().st_size > 5000
    card = (reference / "final" / "README.md").read_text(encoding="utf-8")
    assert "held-out loss of news, before / after training" in card and "80% news" in card
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((reference / "tensorboard").rglob("events.out.tfevents.*")).parent)).Reload()
    assert {"eval/news_loss", "eval/replay_loss"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_a_mixed_run_stopped_mid_epoch_resumes_to_the_same_curve(inputs, reference):
    output = inputs["root"] / "stopped"
    args = _train_args(inputs, output)
    with (inputs["root"] / "stopped.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "job", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,
        )
        deadline = time.time() + 600
        while not ((output / "metrics.jsonl").exists() and len(_losses(output)) >= 4):
            assert proc.poll() is None and time.time() < deadline, (inputs["root"] / "stopped.log").read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == EXIT_PREEMPTED, (inputs["root"] / "stopped.log").read_text()[-3000:]
    stopped = max(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*"))
    assert 4 <= stopped < STEPS
    resumed = job(*args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    ours, ref = _losses(output), _losses(reference)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in range(stopped + 1, STEPS + 1):  # the same batches after the resume: the same losses
        assert ours[step] == pytest.approx(ref[step], rel=1e-6), (step, ours[step], ref[step])
    evals = [(r["step"], r["eval_news_loss"]) for r in _records(reference) if "eval_news_loss" in r]
    assert [(r["step"], r["eval_news_loss"]) for r in _records(output) if "eval_news_loss" in r][-1] == pytest.approx(
        evals[-1], rel=1e-6
    )


@pytest.mark.slow
def test_a_changed_mix_refuses_to_resume(inputs, reference):
    before = sorted(reference.rglob("*"))
    for mix in ("0.7:news={news},0.3:replay={replay}", "0.8:news={news},0.2:other={replay}"):
        proc = job(*_train_args(inputs, reference, mix))
        assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert "holds a different run (changed: data)" in proc.stderr
    assert sorted(reference.rglob("*")) == before


def test_prepare_writes_each_source_and_prints_the_prepared_mix(tmp_path, tiny_tokenizer_dir):
    news, replay = _corpora(tmp_path)
    args = ["prepare", "--data", f"0.8:news={news},0.2:replay={replay}", "--tokenizer", str(tiny_tokenizer_dir)]
    refused = job(*args, "--output", str(tmp_path / "set"), "--shard", "0/2")
    assert refused.returncode == EXIT_BAD_INPUT and "--shard takes one source" in refused.stderr, refused.stderr
    assert not (tmp_path / "set").exists()
    proc = job(*args, "--max-length", "32", "--output", str(tmp_path / "set"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = json.loads(proc.stdout)
    assert parse_mix(shown["prepared"]) == [
        Source("news", 0.8, str(tmp_path / "set" / "news")),
        Source("replay", 0.2, str(tmp_path / "set" / "replay")),
    ]
    assert shown["sources"]["news"]["documents"] == 200 and shown["sources"]["replay"]["max_length"] == 32


@pytest.mark.parametrize("mode", ["--tokenize", "--prepare"])
def test_bench_of_one_corpus_refuses_a_mix_in_one_line(tmp_path, mode):
    news, replay = _corpora(tmp_path)
    proc = job("bench", mode, "--data", f"1:news={news},1:replay={replay}")
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: bench --tokenize/--prepare measures one corpus, and --data is a mix -- pass one source's path as --data"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["news.jsonl", "replay.jsonl"]


@pytest.mark.slow
def test_eval_workers_scale_with_the_processes_not_with_the_sources(inputs, tmp_path):
    """Six sources, two DataLoader workers: while the run evaluates every source again and again, the rank never
    holds more than its training workers and one source's eval workers (persistent loaders kept 2 per source)."""
    import psutil

    from job.data.corpus import builtin_articles

    articles = builtin_articles()
    paths = {f"s{i}": write_jsonl(tmp_path / f"s{i}.jsonl", articles[i * 40 : (i + 1) * 40]) for i in range(6)}
    mix = ",".join(f"1:{name}={path}" for name, path in paths.items())
    output = tmp_path / "run"
    args = _train_args(inputs, output, mix, "--dataloader-workers", "2", "--eval-steps", "2", "--max-steps", "10")
    proc = subprocess.Popen([sys.executable, "-m", "job", *args], stderr=subprocess.PIPE, text=True, env=_env())
    most = 0
    try:
        while proc.poll() is None:
            try:
                most = max(most, len(psutil.Process(proc.pid).children(recursive=True)))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    evaluated = {k for r in _records(output) for k in r if k.startswith("eval_s") and k.endswith("_loss")}
    assert len(evaluated) == 6
    assert 2 < most <= 4, most  # 2 training workers + 2 of one source at a time (not 2 + 12)
