"""The Click layer: a few lines per command over the modules. Errors meant for people are handled here:
one line on stderr naming the cause and the fix, exit code 2, no traceback unless --debug."""

from __future__ import annotations

import json
import logging
import os
import sys
import types
import typing
from pathlib import Path

import click

from job.config import RunConfig
from job.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, JobError, Stopped, stop_at_once

DATA_FIELDS = [
    "data",
    "text_column",
    "max_samples",
    "eval_fraction",
    "max_length",
    "packing",
    "num_proc",
    "tokenizer",
    "vocab_size",
    "model",
    "trust_remote_code",
    "seed",
]
MODEL_FIELDS = ["model", "tokenizer", "preset", "attention", "trust_remote_code"]
TRAIN_FIELDS = [f for f in RunConfig.field_names() if f != "prompts"]
HELP = {
    "data": "corpus: save_to_disk folder, .json/.jsonl/.parquet files or glob, or hub id (default: built-in)",
    "prepared": "a folder written by `prepare` (skips preparation)",
    "model": "local HF Bloom folder to continue from (default: random init from --preset)",
    "tokenizer": "HF tokenizer folder (default: the model's, else the built-in BPE)",
    "deepspeed": "DeepSpeed JSON file, or 'none' for plain DDP",
    "resume": "auto (newest complete checkpoint), never, or a checkpoint folder",
    "nproc": "processes per node (default: every visible GPU, 1 without)",
    "attention": "auto | eager | sdpa | flex",
    "preset": "tiny | bloom-389m-zh (random init when no --model)",
}


def _option(name: str):
    hint = typing.get_type_hints(RunConfig)[name]
    flag = "--" + name.replace("_", "-")
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    base = next(t for t in options if t is not type(None))
    if base is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=HELP.get(name))
    return click.option(flag, name, type=base, default=None, help=HELP.get(name))


def config_options(fields: list[str]):
    """Click options for these RunConfig fields (None = not given), plus --config."""

    def decorate(fn):
        for name in reversed(fields):
            fn = _option(name)(fn)
        return click.option(
            "--config", "config", default=None, help="recipe name (quickstart, h100, tutorial) or JSON config file"
        )(fn)

    return decorate


def _load(config: str | None, values: dict) -> RunConfig:
    return RunConfig.load(config, **values)


class JobGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except JobError as e:
            if os.environ.get("JOB_DEBUG") == "1":
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=JobGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="show tracebacks for errors")
def cli(debug: bool):
    """Continued pre-training of a Chinese Bloom causal LM (HF Trainer + DeepSpeed ZeRO)."""
    if debug:
        os.environ["JOB_DEBUG"] = "1"
    logging.basicConfig(level=logging.INFO, format="[job] %(message)s")
    for noisy in ("datasets", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@cli.command()
@config_options(DATA_FIELDS)
@click.option("--output", "output", type=click.Path(), default=None, help="folder to write (default: the cache)")
def prepare(config, output, **values):
    """Tokenize, add eos, pack or truncate a corpus once; print its stats.json."""
    from job.corpus import load_corpus
    from job.prepare import prepare as run_prepare
    from job.tokenizer import resolve_tokenizer

    cfg = _load(config, values)
    corpus = load_corpus(cfg.data, cfg.text_column, cfg.max_samples)
    tokenizer = resolve_tokenizer(cfg.tokenizer, cfg.model, cfg.vocab_size, cfg.trust_remote_code)
    result = run_prepare(cfg, tokenizer, output, corpus=corpus)
    click.echo(
        json.dumps(
            {"path": str(result.path), "cache_hit": result.cache_hit, **result.stats}, ensure_ascii=False, indent=2
        )
    )


@cli.command()
@click.option("--data", default=None, help="corpus to train on (default: built-in)")
@click.option("--text-column", default="completion", show_default=True)
@click.option("--vocab-size", type=int, default=8000, show_default=True)
@click.option("--output", required=True, type=click.Path(), help="folder for the HF tokenizer")
def tokenizer(data, text_column, vocab_size, output):
    """Train a Bloom-style byte-level BPE on a corpus."""
    from job.corpus import TEXT, load_corpus
    from job.tokenizer import train_tokenizer

    corpus = load_corpus(data, text_column)
    tok = train_tokenizer((row[TEXT] for row in corpus.rows), vocab_size, Path(output))
    click.echo(json.dumps({"output": output, "vocab_size": len(tok), "eos": tok.eos_token, "pad": tok.pad_token}))


@cli.command()
@config_options(TRAIN_FIELDS)
def train(config, **values):
    """Prepare (once), launch on --nproc processes x --nnodes nodes, train, export OUTPUT/final."""
    from job.launch import train as launch_train

    cfg = _load(config, values)
    code = launch_train(cfg)
    if code == 0:
        click.echo(f"done: model in {Path(cfg.output_dir) / 'final'}, report in {Path(cfg.output_dir) / 'report.md'}")
    sys.exit(code)


@cli.command(hidden=True)
@click.option("--config", required=True, type=click.Path(exists=True))
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, help="set by launchers")
def worker(config, local_rank):
    """One training process (started by `train` through torchrun or the deepspeed launcher)."""
    from job.train import run_worker

    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    cfg = RunConfig.load(config)
    run_worker(cfg)  # the verdict goes to exit_status.json; exiting 0 keeps torchrun from killing peers


@cli.command()
@config_options(TRAIN_FIELDS)
def doctor(config, **values):
    """Preflight: GPUs, /dev/shm, disk, caches, data, tokenizer, DeepSpeed config and batch arithmetic."""
    from job.doctor import format_table, run_checks

    cfg = _load(config, values)
    results = run_checks(cfg, extra=_input_checks(cfg))
    click.echo(format_table(results))
    sys.exit(0 if all(r.ok for r in results) else EXIT_BAD_INPUT)


def _input_checks(cfg: RunConfig):
    from job.doctor import Check, check_disk, model_parameters

    state = {}

    def data():
        from job.corpus import load_corpus
        from job.prepare import read_prepared_stats

        if cfg.prepared:
            stats = read_prepared_stats(cfg.prepared)
            return Check("data", True, f"prepared: {stats['rows']} rows of <= {stats['max_length']} tokens")
        corpus = load_corpus(cfg.data, cfg.text_column, cfg.max_samples)
        return Check("data", True, f"{corpus.name}: {len(corpus.rows)} documents, column {cfg.text_column!r}")

    def tokenizer():
        from job.tokenizer import resolve_tokenizer

        state["tokenizer"] = tok = resolve_tokenizer(cfg.tokenizer, cfg.model, cfg.vocab_size, cfg.trust_remote_code)
        return Check("tokenizer", True, f"{len(tok)} tokens, eos {tok.eos_token_id}, pad {tok.pad_token_id}")

    def disk():
        tok = state.get("tokenizer")
        return check_disk(cfg, model_parameters(cfg, len(tok) if tok else None))

    return [data, tokenizer, disk]


@cli.command()
@click.option("--model", required=True, type=click.Path(), help="HF model folder (e.g. OUTPUT/final)")
@click.option("--prompt", "prompts", multiple=True, help="prompt text (repeatable)")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), help="one prompt per line")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--greedy/--sample", default=False, show_default=True)
@click.option("--top-k", type=int, default=50, show_default=True)
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON lines")
def generate(model, prompts, prompts_file, as_json, **sampling):
    """Generate continuations for prompts (batched, left-padded)."""
    from job.generate import generate as run_generate
    from job.generate import load_for_inference

    texts = list(prompts) + (Path(prompts_file).read_text(encoding="utf-8").splitlines() if prompts_file else [])
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise JobError("no prompt given", "pass --prompt TEXT or --prompts-file FILE")
    if sampling["temperature"] <= 0 and not sampling["greedy"]:
        raise JobError(
            f"--temperature {sampling['temperature']} must be above 0 when sampling", "use --greedy or a positive value"
        )
    lm, tok = load_for_inference(model)
    for out in run_generate(lm, tok, texts, **sampling):  # the options are named as generate()'s arguments
        click.echo(json.dumps(out, ensure_ascii=False) if as_json else f"{out['prompt']}{out['text']}")


@cli.command()
@click.option("--model", required=True, type=click.Path(), help="HF model folder (e.g. OUTPUT/final)")
def smoke(model):
    """Reload a model in this fresh process and check its generations; prints JSON, exit 0 only if all hold."""
    from job.generate import smoke as run_smoke

    result = run_smoke(model)
    click.echo(json.dumps(result, ensure_ascii=False, indent=2))
    sys.exit(0 if result["ok"] else 1)


@cli.command()
@config_options(TRAIN_FIELDS)
@click.option("--steps", type=int, default=10, show_default=True, help="timed optimizer steps")
@click.option("--warmup", type=int, default=3, show_default=True, help="untimed steps first (compilation, caches)")
@click.option("--synthetic/--corpus", default=True, show_default=True, help="random tokens, or the prepared corpus")
@click.option(
    "--compare",
    type=click.Choice(["eager", "sdpa", "flex", "no-deepspeed"]),
    default=None,
    help="also run a baseline in the same process and report the ratio: eager = the stock HF Bloom model "
    "(eager attention, full-logits loss), sdpa/flex = that attention, no-deepspeed = --deepspeed none",
)
@click.option("--tokenize", "tokenize_mode", is_flag=True, help="benchmark prepare against the bare tokenizer")
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="--tokenize: rounds, the best of each counts",
)
@click.option("--scale", type=click.IntRange(min=1), default=1, show_default=True, help="--tokenize: corpus x N")
def bench(config, steps, warmup, synthetic, compare, tokenize_mode, repeats, scale, **values):
    """Time the real training path (or tokenization); print one JSON line of figures."""
    from job.bench import bench_tokenize, dumps, run_bench
    from job.doctor import resolve_master_port
    from job.launch import single_process_env

    cfg = _load(config, values)
    if tokenize_mode:
        click.echo(dumps(bench_tokenize(cfg, repeats, scale)))
        return
    cfg.master_port = resolve_master_port(cfg)
    single_process_env(cfg)
    click.echo(dumps(run_bench(cfg, steps, warmup, synthetic, compare)))


def main():
    stop_at_once()  # first thing: as PID 1 in a container, Python would ignore SIGTERM until a handler exists
    try:
        cli(prog_name="python -m job")
    except Stopped as e:  # a signal before training began (training records its own verdict): nothing to keep
        click.echo(f"stopped by {e.signal_name} before training began -- run the same command again", err=True)
        sys.exit(EXIT_PREEMPTED)
