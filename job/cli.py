"""The Click layer: a few lines per command over the modules. Errors meant for people are handled here:
one line on stderr naming the cause and the fix, exit code 2, no traceback unless --debug."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import NoReturn

import click

from job.core import run_files
from job.core.config import GROUPS, RunConfig, field_meta, field_types, flag, prepare_fields, read_config_file
from job.core.errors import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_PREEMPTED, JobError, crash_summary, raise_if_disk_full
from job.core.logs import FORMATS, LOG_FORMAT_ENV, setup_logging
from job.core.signals import Stopped, exit_without_teardown, stop_at_once
from job.core.termination import no_termination_message, record_termination
from job.model.sampling import READING_SAMPLES as READING

# Fields a command line can set (a list, like `prompts`, comes from a --config file only).
_HINTS = field_types()
TRAIN_FIELDS = [name for name in RunConfig.field_names() if typing.get_origin(_HINTS[name]) is not list]


class GroupedCommand(click.Command):
    """`--help` in sections, one per concern of the run config (`GROUPS`), then the command's own options; with
    `--config RECIPE` before `--help`, each field the recipe sets shows its value there as the effective default."""

    def parse_args(self, ctx, args):
        ctx.meta["job_args"] = list(args)  # --help is eager: read --config from the raw arguments
        return super().parse_args(ctx, args)

    def format_options(self, ctx, formatter):
        recipe = _recipe_values(ctx.meta.get("job_args", []))
        sections: dict[str, list] = {group: [] for group in GROUPS}
        own = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name = param.name
            if name in recipe and name in RunConfig.field_names():
                record = (record[0], f"{record[1]}  [{recipe['_name']}: {recipe[name]}]")
            if name in RunConfig.field_names():
                sections[field_meta(name)["group"]].append(record)
            else:
                own.append(record)
        for group, records in sections.items():
            if records:
                with formatter.section(f"{group.capitalize()} options"):
                    formatter.write_dl(records)
        if own:
            with formatter.section("Other options"):
                formatter.write_dl(own)


def _recipe_values(args: list[str]) -> dict:
    """The values the `--config` named on the command line sets ({} when none, or it cannot be read)."""
    name = next((v for k, v in itertools.pairwise(args) if k == "--config"), None)
    name = name or next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if not name:
        return {}
    try:
        values = read_config_file(name)
    except JobError:
        return {}
    return {**values, "_name": name}


def _option(name: str):
    """The Click option of a RunConfig field, from its type and metadata (None = not given)."""
    meta = field_meta(name)
    hint = _HINTS[name]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    base = next(t for t in options if t is not type(None))
    default = next(f for f in dataclasses.fields(RunConfig) if f.name == name).default
    text = meta["help"] + (f"  [default: {default}]" if default not in (None, dataclasses.MISSING, "") else "")
    if meta["text"] is not None:  # a structured value: its text, parsed once by RunConfig
        return click.option(flag(name), name, type=str, default=None, help=text)
    if base is bool:
        return click.option(f"{flag(name)}/--no-{flag(name)[2:]}", name, default=None, help=text)
    if typing.get_origin(base) is typing.Literal:
        return click.option(flag(name), name, type=click.Choice(typing.get_args(base)), help=text)
    if typing.get_origin(base) is dict:  # training_args: --training-arg NAME=VALUE, repeatable
        return click.option(
            "--training-arg", name, multiple=True, callback=_name_values, metavar="NAME=VALUE", help=text
        )
    return click.option(flag(name), name, type=base, default=None, help=text)


def _name_values(ctx, param, values: tuple[str, ...]) -> dict[str, str] | None:
    pairs = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", ctx, param)
        pairs[name.strip()] = value
    return pairs or None


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


# The subcommand running (for the message of a signal that stops it), the run folder it names (`output_dir`, read
# for the termination message) and, once its launcher holds that folder's lock, the folder it writes its verdict in.
_INVOKED: dict[str, str | None] = {}
MAX_NEW_TOKENS = 65536  # generation beyond this is a mistake, not a request (Bloom's ALiBi has no length limit)


def _finite(ctx, param, value: float) -> float:
    """FloatRange lets nan through (every comparison with nan is false)."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


class JobGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except JobError as e:
            if os.environ.get("JOB_DEBUG") == "1":
                raise
            click.echo(f"error: {e}", err=True)
            record_termination(e.exit_code, f"error: {e}", _INVOKED.get("output_dir"))
            sys.exit(e.exit_code)


@click.group(cls=JobGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="show tracebacks for errors")
@click.option(
    "--log-format",
    type=click.Choice(FORMATS),
    default=None,
    help=f"log lines as text (time level rank message) or JSON lines  [default: ${LOG_FORMAT_ENV}, else text]",
)
@click.pass_context
def cli(ctx, debug: bool, log_format: str | None):
    """Continued pre-training of a Chinese Bloom causal LM (HF Trainer + DeepSpeed ZeRO)."""
    _INVOKED.clear()  # a second invocation in one process (an in-process caller) starts without the first's folder
    _INVOKED["command"] = ctx.invoked_subcommand
    if debug:
        os.environ["JOB_DEBUG"] = "1"
    setup_logging(log_format)


@cli.command(cls=GroupedCommand)
@config_options(prepare_fields())
@click.option("--output", "output", type=click.Path(), default=None, help="folder to write (default: the cache)")
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="write shard I of N (0 to N-1) into the same --output or cache folder; the last one to finish writes the "
    "index that makes the N shards one prepared dataset (an Indexed Job: I = the completion index)",
)
def prepare(config, output, shard, **values):
    """Tokenize, add eos, pack or truncate a corpus once; print its stats.json."""
    from job.data.corpus import load_run_corpus
    from job.data.mix import sources
    from job.data.prepare import Shard
    from job.data.prepare import prepare as run_prepare
    from job.data.tokenizer import run_tokenizer

    part = Shard.parse(shard) if shard is not None else None  # before anything is read or written
    cfg = _load(config, values)
    if sources(cfg):
        _prepare_mix(cfg, output, part)
        return
    corpus = load_run_corpus(cfg)
    tokenizer = run_tokenizer(cfg)
    result = run_prepare(cfg, tokenizer, output, corpus=corpus, shard=part)
    shown = {"path": str(result.path), "cache_hit": result.cache_hit, **result.stats}
    click.echo(json.dumps({**shown, **({"shard": part.name} if part else {})}, ensure_ascii=False, indent=2))


def _prepare_mix(cfg: RunConfig, output: str | None, part) -> None:
    """`prepare` of a --data mix: each source on its own, into OUTPUT/NAME (default: the cache); prints the
    `--prepared` mix that trains on them."""
    from job.data.mix import load_source_corpora, prepare_mix, sources
    from job.data.tokenizer import run_tokenizer

    if part is not None:
        raise JobError("--shard takes one source, not a --data mix", "prepare each source of the mix on its own")
    corpora = load_source_corpora(cfg, sources(cfg))  # all readable before anything is written
    tokenizer = run_tokenizer(cfg)
    prepared, done = prepare_mix(cfg, tokenizer, corpora, output)
    shown = {n: {"path": str(r.path), "cache_hit": r.cache_hit, **r.stats} for n, r in done.items()}
    click.echo(json.dumps({"prepared": str(prepared), "sources": shown}, ensure_ascii=False, indent=2))


@cli.command()
@_option("data")
@_option("text_column")
@_option("vocab_size")
@click.option("--output", required=True, type=click.Path(), help="a new or empty folder for the HF tokenizer")
def tokenizer(data, text_column, vocab_size, output):
    """Train a Bloom-style byte-level BPE on a corpus (a mix: on every source's documents, whatever the weights)."""
    from job.data.corpus import TEXT, load_run_corpus
    from job.data.mix import load_source_corpora, sources
    from job.data.tokenizer import check_new_folder, train_tokenizer

    cfg = RunConfig.load(data=data, text_column=text_column, vocab_size=vocab_size)  # defaults and ranges
    check_new_folder(Path(output))  # before reading the corpus: a wrong --output fails in a second
    mix = sources(cfg)
    corpora = list(load_source_corpora(cfg, mix).values()) if mix else [load_run_corpus(cfg)]
    tok = train_tokenizer((row[TEXT] for c in corpora for row in c.rows), cfg.vocab_size, Path(output))
    click.echo(json.dumps({"output": output, "vocab_size": len(tok), "eos": tok.eos_token, "pad": tok.pad_token}))


@cli.command(cls=GroupedCommand)
@config_options(TRAIN_FIELDS)
def train(config, **values):
    """Prepare (once), launch on --nproc processes x --nnodes nodes, train, export OUTPUT/final."""
    from job.run.launch import train as launch_train

    cfg = _load(config, values)
    _INVOKED["output_dir"] = cfg.output_dir  # what a crash's termination message describes

    def claimed(folder: Path) -> None:  # the lock is held: the folder is this run's, and so is its verdict
        _INVOKED["run_folder"] = str(folder)

    code = launch_train(cfg, claimed)
    output = Path(cfg.output_dir)
    status = run_files.recorded_status(output) if output.is_dir() else None
    verdict = status["message"] if status and status["code"] == code else f"train ended with exit code {code}"
    record_termination(code, verdict, output)
    if code == 0:
        click.echo(f"done: model in {output / run_files.FINAL}, report in {output / run_files.REPORT}")
    sys.exit(code)


@cli.command(hidden=True)
@click.option(
    "--config",
    required=True,
    type=click.Path(exists=True),
    help="the run's run_config.json (written by train); its launch comes from train through the environment",
)
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, help="set by launchers")
def worker(config, local_rank):
    """One training process (started by `train` through torchrun or the deepspeed launcher)."""
    from job.run.worker import run_worker

    no_termination_message()  # the launcher writes the run's verdict
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    cfg = RunConfig.load(config)
    run_worker(cfg)  # the verdict goes to exit_status.json; exiting 0 keeps torchrun from killing peers
    if int(os.environ.get("RANK", "0")) != 0:
        exit_without_teardown(0)


@cli.command(cls=GroupedCommand)
@config_options(TRAIN_FIELDS)
def doctor(config, **values):
    """Preflight: every check `train` runs first (launch settings and their sources, devices, DeepSpeed, output,
    data, tokenizer, model, memory, disk)."""
    from job.run.preflight import format_table, run_checks

    cfg = _load(config, values)
    results, _ = run_checks(cfg)
    click.echo(format_table(results))
    failed = [r for r in results if not r.ok]
    if failed:  # what an init container's termination message then says
        record_termination(EXIT_BAD_INPUT, format_table(failed))
    sys.exit(EXIT_BAD_INPUT if failed else 0)


@cli.command(cls=GroupedCommand)
@config_options(TRAIN_FIELDS)
@click.option("--gpus", type=click.IntRange(min=1), default=None, help="GPUs per node (default: this machine's)")
@click.option("--nodes", type=click.IntRange(min=1), default=None, help="nodes (default: --nnodes, else 1)")
@click.option("--gpu-memory", type=click.FloatRange(min=0, min_open=True), default=None, help="GiB per GPU")
@click.option("--cpu-memory", type=click.FloatRange(min=0, min_open=True), default=None, help="GiB per node")
def plan(config, gpus, nodes, gpu_memory, cpu_memory, **values):
    """The memory plan of a run on a machine (this one, or --gpus x --nodes of --gpu-memory GiB): per GPU the
    parameters, gradients, optimizer states, activations and buffers against the memory, and the CPU memory offload
    needs. Exit 0 if it fits, else 2 and the settings that would (--plan auto: plans those)."""
    from job.core.topology import device_type, processes_per_node
    from job.model.attention import resolve_attention
    from job.model.build import model_config
    from job.run.launch_record import launch_on
    from job.run.memory_plan import (
        GiB,
        auto_conflict,
        machine_here,
        plan_run,
        refusal,
        settings_flags,
        why,
        with_settings,
    )

    cfg = _load(config, values)
    # a what-if for a machine that may not be this one: the launch it would get there, not this machine's
    here = machine_here(processes_per_node(cfg), cfg.nnodes or 1, device_type(cfg), gpus, nodes)
    target = gpus is not None or gpu_memory is not None  # planned for GPUs named here, not for this machine's
    if target and gpu_memory is None and here.device != "cuda":
        raise JobError(
            f"--gpus {gpus} plans for GPUs, and this machine has none to read their memory from",
            "add --gpu-memory GiB (e.g. 80 for an H100)",
        )
    machine = dataclasses.replace(
        here,
        gpu_memory=int(gpu_memory * GiB) if gpu_memory else here.gpu_memory,
        cpu_memory=int(cpu_memory * GiB) if cpu_memory else here.cpu_memory,
        device="cuda" if target else here.device,
    )
    attention = resolve_attention(cfg.attention, machine.device)
    mine, best = plan_run(cfg, model_config(cfg, None), machine, attention)
    click.echo("\n".join(mine.lines()))
    if cfg.plan == "auto" and best is not None:
        launch = launch_on(cfg, machine.gpus_per_node, machine.nodes, machine.device, attention)
        conflict = auto_conflict(with_settings(cfg, best.settings), best.settings, launch)
        if conflict:
            raise conflict
        click.echo(f"--plan auto: {settings_flags(best.settings)}: {why(best.settings, mine.settings)}")
        click.echo("\n".join(best.lines()))
        sys.exit(0)
    if not mine.fits:
        raise refusal(mine, best)
    sys.exit(0)


@cli.command()
@click.option("--model", required=True, type=click.Path(), help="HF model folder (e.g. OUTPUT/final)")
@click.option("--prompt", "prompts", multiple=True, help="prompt text (repeatable)")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), help="one prompt per line")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1, MAX_NEW_TOKENS),
    default=64,
    show_default=True,
    help="tokens to generate per prompt",
)
@click.option("--greedy/--sample", default=READING["greedy"], show_default=True, help="greedy decoding, or sampling")
@click.option(
    "--top-k",
    type=click.IntRange(min=0),
    default=READING["top_k"],
    show_default=True,
    help="sampling: the k most likely tokens",
)
@click.option(
    "--top-p",
    type=click.FloatRange(0, 1, min_open=True),
    callback=_finite,
    default=READING["top_p"],
    show_default=True,
    help="sampling: nucleus probability mass",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0, 1e4, min_open=True),
    callback=_finite,
    default=READING["temperature"],
    show_default=True,
    help="sampling: logits divided by this (above 0)",
)
@click.option(
    "--repetition-penalty",
    type=click.FloatRange(0, 1e4, min_open=True),
    callback=_finite,
    default=READING["repetition_penalty"],
    show_default=True,
    help="divides the logits of tokens already in the text (1.0: none)",
)
@click.option(
    "--seed", type=click.IntRange(0, 2**32 - 1), default=READING["seed"], show_default=True, help="sampling seed"
)
@click.option("--json", "as_json", is_flag=True, help="print JSON lines")
def generate(model, prompts, prompts_file, as_json, **sampling):
    """Generate continuations for prompts (batched, left-padded); by default as the report's samples are drawn."""
    from job.model.generate import generate as run_generate
    from job.model.generate import load_for_inference, read_prompts

    texts = list(prompts) + (read_prompts(Path(prompts_file)) if prompts_file else [])
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise JobError("no prompt given", "pass --prompt TEXT or --prompts-file FILE")
    lm, tok = load_for_inference(model)
    for out in run_generate(lm, tok, texts, **sampling):  # the options are named as generate()'s arguments
        click.echo(json.dumps(out, ensure_ascii=False) if as_json else f"{out['prompt']}{out['text']}")


@cli.command()
@click.option("--model", required=True, type=click.Path(), help="HF model folder (e.g. OUTPUT/final)")
def smoke(model):
    """Reload a model in this fresh process and check its generations; prints JSON, exit 0 only if all hold."""
    from job.model.generate import smoke as run_smoke

    result = run_smoke(model)
    click.echo(json.dumps(result, ensure_ascii=False, indent=2))
    sys.exit(0 if result["ok"] else 1)


@cli.command()
@click.option("--model", required=True, type=click.Path(), help="the export to upload (OUTPUT/final)")
@click.option("--repo", "repo_id", required=True, help="hub repository id, OWNER/NAME (created if missing)")
@click.option("--private/--public", default=True, show_default=True, help="visibility of a repository it creates")
@click.option("--message", "commit_message", default=None, help="commit message (default: names the export)")
@click.option("--revision", default=None, help="branch to push to (created from main if missing; default main)")
def push(model, repo_id, private, commit_message, revision):
    """Upload a verified export with its model card to the hub ($HF_ENDPOINT, token from $HF_TOKEN); run again
    after an interruption, it sends only what the hub does not have yet."""
    from job.run.push import push as run_push

    click.echo(run_push(model, repo_id, private, commit_message, revision))


@cli.command(cls=GroupedCommand)
@config_options(TRAIN_FIELDS)
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="timed optimizer steps")
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="untimed steps first (compilation, caches)",
)
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
@click.option("--prepare", "prepare_mode", is_flag=True, help="benchmark prepare at corpus scale (tokens/s, memory)")
@click.option(
    "--copies",
    default="1,4,16",
    show_default=True,
    help="--prepare: corpus sizes, as copies of the corpus (comma-separated)",
)
@click.option(
    "--train-steps",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="--prepare: also train a tiny model N steps on each size (the memory of starting a run)",
)
@click.option(
    "--profile-steps",
    type=click.IntRange(min=0),
    default=0,
    help="torch-profile N steps after the warm-up: top GPU kernels",
)
def bench(config, steps, warmup, synthetic, compare, tokenize_mode, repeats, scale, prepare_mode, copies, **values):
    """Time the real training path (or tokenization, or prepare at corpus scale); print one JSON line of figures.

    With --synthetic and no --tokenizer/--model, a word-level tokenizer of --vocab-size entries stands in: no
    corpus and no BPE training needed."""
    from job.run.bench import bench_prepare, bench_tokenize, dumps, run_bench
    from job.run.launch import single_process_env

    profile_steps, train_steps = values.pop("profile_steps"), values.pop("train_steps")
    cfg = _load(config, values)
    if (prepare_mode or tokenize_mode) and cfg.data is not None and cfg.data.mixed:
        raise JobError(
            "bench --tokenize/--prepare measures one corpus, and --data is a mix", "pass one source's path as --data"
        )
    if prepare_mode:
        sizes = _copies(copies)
        click.echo(dumps(bench_prepare(cfg, sizes, train_steps)))
        return
    if tokenize_mode:
        click.echo(dumps(bench_tokenize(cfg, repeats, scale)))
        return
    single_process_env(cfg)
    click.echo(dumps(run_bench(cfg, steps, warmup, synthetic, compare, profile_steps)))


def _copies(text: str) -> list[int]:
    try:
        sizes = [int(n) for n in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise JobError(f"--copies {text!r} is not a list of positive whole numbers", "pass e.g. --copies 1,4,16")
    return sizes


def main():
    stop_at_once()  # first thing: as PID 1 in a container, Python would ignore SIGTERM until a handler exists
    try:
        code = cli.main(prog_name="python -m job", standalone_mode=False)
    except click.UsageError as e:  # Click's own four lines (usage, hint, blank, error) as one, like every refusal
        command = e.ctx.command_path if e.ctx else "python -m job"
        message = f"error: {e.format_message()} -- see `{command} --help`"
        click.echo(message, err=True)
        record_termination(EXIT_BAD_INPUT, message)  # no stale verdict of an earlier run stays in the file
        sys.exit(EXIT_BAD_INPUT)
    except click.Abort as e:  # Click turns an EOFError (a truncated compressed file, say) into Abort
        if isinstance(e.__cause__, EOFError):
            click.echo(f"error: input ended early ({e.__cause__}) -- check that the file is whole", err=True)
            sys.exit(EXIT_BAD_INPUT)
        click.echo("error: aborted", err=True)
        sys.exit(EXIT_PREEMPTED)
    except Stopped as e:  # a signal outside training (training records its own verdict): nothing to keep
        when = " before training began" if _INVOKED.get("command") == "train" else ""
        message = f"stopped by {e.signal_name}{when} -- run the same command again"
        click.echo(message, err=True)
        record_termination(EXIT_PREEMPTED, message)
        sys.exit(EXIT_PREEMPTED)
    except Exception as e:
        _crashed(e)
    sys.exit(code if isinstance(code, int) else 0)


def _crashed(error: Exception) -> NoReturn:
    """A verdict for an error no refusal caught: a write the disk refused (full, over quota, over a file-size limit)
    is one line, exit 2, as for `prepare`; anything else is a crash, exit 1, with its traceback (a JSON record under
    --log-format json, not raw lines). Either way the termination message, and a run's exit_status.json, say so."""
    try:
        raise_if_disk_full(error, getattr(error, "filename", None) or "a file")
    except JobError as full:
        if os.environ.get("JOB_DEBUG") == "1":
            raise error from None
        message = f"error: {full}"
        click.echo(message, err=True)
        _record_verdict(full.exit_code, message)
        sys.exit(full.exit_code)
    _record_verdict(EXIT_CRASH, f"crash: {crash_summary(error)}")
    if os.environ.get(LOG_FORMAT_ENV) == "json" and os.environ.get("JOB_DEBUG") != "1":
        logging.getLogger("job").error("crash: %s", crash_summary(error), exc_info=error)
        sys.exit(EXIT_CRASH)
    raise error


def _record_verdict(code: int, message: str) -> None:
    """The termination message, and the run's exit_status.json once this launcher holds its folder (never into a
    folder it has not claimed: another tool's, or a running job's), if the folder takes it."""
    if _INVOKED.get("run_folder"):
        run_files.write_status_if_possible(Path(_INVOKED["run_folder"]), code, message)
    record_termination(code, message, _INVOKED.get("output_dir"))
