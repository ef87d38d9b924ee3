"""job.run.model_card: final/README.md in the Hugging Face format, with the run's figures; written inside the
verified export, so final/ never appears without it."""

from __future__ import annotations

import json
import math

import pytest
from huggingface_hub import ModelCard

from job.core import checkpoints, run_files
from job.core.config import RunConfig
from job.run.model_card import card_datasets, render_model_card
from job.run.report import run_figures, run_summary
from tests.conftest import launch_of, tiny_bloom

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
    assert "repetition_penalty" in text  # how to get readable samples


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
