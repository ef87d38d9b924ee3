"""job.run.model_card: final/README.md in the Hugging Face format, with the run's figures; written inside the
verified export, so final/ never appears without it."""

from __future__ import annotations

import json
import math

import pytest
from huggingface_hub import ModelCard

from job.core import checkpoints, run_files
from job.core.config import RunConfig
from job.model.sampling import READING_SAMPLES
from job.run.model_card import card_datasets, render_model_card
from job.run.report import run_figures, run_summary
from tests.conftest import launch_of, tiny_bloom, write_jsonl

RECORDS = [
    {"step": 0, "eval_loss": 7.65, "tokens_seen": 0},
    {"step": 10, "loss": 7.1, "tokens_seen": 40_000},
    {"step": 20, "loss": 5.3, "tokens_seen": 81_920},
    {"step": 20, "eval_loss": 5.10, "tokens_seen": 81_920},
]


def test_the_card_has_hub_metadata_and_the_runs_figures(tmp_path):
    cfg = RunConfig.load(
        data="pleisto/wikipedia-cn-20230720-filtered",
        model=str(tmp_path / "bloom-389m-zh"),
        base_model="Langboat/bloom-389m-zh",
        license="bigscience-bloom-rail-1.0",
        bf16=True,
    )
    figures = run_figures(RECORDS, run_summary({"global_step": 20, "num_input_tokens_seen": 81_920}, {}, 754.0))
    card_path = tmp_path / "README.md"
    card_path.write_text(
        render_model_card(cfg, figures, parameters=345_800_000, launch=launch_of(cfg, nproc=8)), encoding="utf-8"
    )
    card = ModelCard.load(card_path)  # what the hub parses
    assert card.data.language == ["zh"] and card.data.license == "bigscience-bloom-rail-1.0"
    assert card.data.base_model == "Langboat/bloom-389m-zh"
    assert card.data.datasets == ["pleisto/wikipedia-cn-20230720-filtered"]
    assert card.data.pipeline_tag == "text-generation" and "bloom" in card.data.tags
    text = card.text
    assert "| optimizer steps | 20 |" in text and "| tokens seen (real, non-padding) | 81,920 |" in text
    assert f"| held-out loss before training | 7.6500 (perplexity {math.exp(7.65):,.2f}) |" in text
    assert f"| held-out loss after training | 5.1000 (perplexity {math.exp(5.10):,.2f}) |" in text
    assert "16 x 4 accumulation x 8 process(es) = 512 rows" in text and "| precision | bf16 |" in text
    assert "| parameters | 345,800,000 |" in text and "0:12:34" in text
    # how to get readable samples: drawn as the report's (the one set of sampling defaults)
    assert f"temperature={READING_SAMPLES['temperature']}" in text
    assert f"repetition_penalty={READING_SAMPLES['repetition_penalty']}" in text


def test_datasets_come_from_the_flag_or_a_hub_id_never_a_local_path(tmp_path):
    local = tmp_path / "news.jsonl"
    local.write_text("{}\n")
    assert card_datasets(RunConfig.load(data=str(local))) == []
    assert card_datasets(RunConfig.load()) == []  # the built-in corpus has no hub id
    assert card_datasets(RunConfig.load(data="owner/name")) == ["owner/name"]
    assert card_datasets(RunConfig.load(data=str(local), dataset_ids="a/b, c/d")) == ["a/b", "c/d"]
    random_init = ModelCard(render_model_card(RunConfig.load(), run_figures([], {})))
    assert random_init.data.base_model is None and random_init.data.license == "other"
    assert "random initialisation (tiny)" in random_init.text and "People's Daily" in random_init.text


def _checkpoint(root, vocab=64):
    checkpoint = root / "checkpoint-20"
    tiny_bloom(vocab).save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 20, "max_steps": 20}))
    return checkpoint


def test_the_export_carries_the_card_and_appears_only_verified(tmp_path):
    output = tmp_path / "out"
    checkpoint = _checkpoint(output)
    card = render_model_card(RunConfig.load(), run_figures(RECORDS, {}))
    final = checkpoints.export_final(checkpoint, output, texts={run_files.MODEL_CARD: card})
    assert (final / run_files.MODEL_CARD).read_text(encoding="utf-8") == card
    (checkpoint / "model.safetensors").write_bytes(b"")  # an export that fails its verification
    (final / run_files.MODEL_CARD).unlink()
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error for a broken file
        checkpoints.export_final(checkpoint, output, texts={run_files.MODEL_CARD: card})
    assert not (final / run_files.MODEL_CARD).exists()  # the old final/ stays as it was: nothing half-new


@pytest.mark.parametrize("given_as", ["data", "prepared"])
def test_card_report_and_preflight_agree_on_a_mix_given_as_data_or_prepared(tmp_path, tiny_tokenizer, given_as):
    """The three readers of the mix show the same sources and shares, whichever flag named it; the card of a run
    given --prepared (the Kubernetes way) names those folders and their shares, not the built-in corpus."""
    from job.data.corpus import builtin_articles
    from job.data.mix import prepare_mix
    from job.run.check_results import Preflight
    from job.run.launch import prepare_inputs
    from job.run.preflight import check_data
    from job.run.report import source_table

    articles = builtin_articles()
    news = write_jsonl(tmp_path / "news.jsonl", articles[:120])
    replay = write_jsonl(tmp_path / "replay.jsonl", articles[120:240])
    layout = dict(max_length=32, eval_fraction=0.1, output_dir=str(tmp_path / "run"))
    data_mix = f"0.8:news={news},0.2:replay={replay}"
    if given_as == "data":
        asked = RunConfig.load(data=data_mix, **layout)
        paths = {"news": str(news), "replay": str(replay)}
    else:
        prepared, done = prepare_mix(RunConfig.load(data=data_mix, **layout), tiny_tokenizer)
        asked = RunConfig.load(prepared=str(prepared), tokenizer=tiny_tokenizer.name_or_path, **layout)
        paths = {name: str(result.path) for name, result in done.items()}
    found = Preflight(asked, tokenizer=tiny_tokenizer, launch=launch_of(asked))
    row = check_data(found)  # what doctor shows
    launched, _ = prepare_inputs(asked, found)  # the config every worker and the export read
    figures = {"source_eval_losses": {"news": (6.0, 5.0), "replay": (6.0, 6.1)}}
    report = "\n".join(source_table(figures, launched.source_data))
    card = ModelCard(render_model_card(launched, run_figures([], {}), launch=found.launch)).text

    assert "news 80%" in row.detail and "replay 20%" in row.detail
    assert "| news | 80% |" in report and "| replay | 20% |" in report
    data_row = next(line for line in card.splitlines() if line.startswith("| data |"))
    assert f"80% news (`{paths['news']}`), 20% replay (`{paths['replay']}`)" in data_row, data_row
    assert "built-in" not in data_row
