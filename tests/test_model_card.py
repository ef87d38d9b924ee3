"""job.run.model_card: final/README.md in the Hugging Face format, with the run's figures; written inside the
verified export, so final/ never appears without it."""

from __future__ import annotations

import json
import math
from pathlib import Path

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


# --------------------------------------------------------------- hub metadata: base model, license, results
MIX_FIGURES = {
    "steps": 20,
    "first_eval_loss": 7.6,
    "final_eval_loss": 5.0,
    "source_eval_losses": {"news": (7.5, 4.9), "wiki": (7.7, 5.2)},
}


def _hub_validated(text: str):
    """The card as the hub reads it: huggingface_hub's parser, and its model-index checks (both ways)."""
    from huggingface_hub import ModelCardData
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    card = ModelCard(text)  # parses and checks the front matter
    meta = card.data.to_dict()
    name, results = model_index_to_eval_results(meta["model-index"])
    assert eval_results_to_model_index(name, results) == meta["model-index"]  # a round trip keeps everything
    again = ModelCardData(**meta)  # what huggingface_hub rebuilds from the metadata alone
    assert again.to_dict() == meta
    return card, name, results


def test_the_model_index_holds_the_held_out_loss_and_perplexity_overall_and_per_source(tmp_path):
    from huggingface_hub import metadata_eval_result

    cfg = RunConfig.load(output_dir=str(tmp_path / "news-run"), dataset_ids="team/news")
    card, name, results = _hub_validated(render_model_card(cfg, MIX_FIGURES))
    assert name == "news-run"
    found = {(r.dataset_config, r.metric_type): r.metric_value for r in results}
    assert found == {
        (None, "loss"): 5.0,
        (None, "perplexity"): round(math.exp(5.0), 4),
        ("news", "loss"): 4.9,
        ("news", "perplexity"): round(math.exp(4.9), 4),
        ("wiki", "loss"): 5.2,
        ("wiki", "perplexity"): round(math.exp(5.2), 4),
    }
    assert {r.dataset_type for r in results} == {"team/news"} and {r.dataset_split for r in results} == {"held-out"}
    # the same entry huggingface_hub's own helper writes for one result
    expected = metadata_eval_result(
        model_pretty_name="news-run",
        task_pretty_name="Causal language modeling",
        task_id="text-generation",
        metrics_pretty_name="loss",
        metrics_id="loss",
        metrics_value=5.0,
        dataset_pretty_name="held-out documents",
        dataset_id="team/news",
        dataset_split="held-out",
    )["model-index"][0]["results"][0]
    overall = card.data.to_dict()["model-index"][0]["results"][0]
    assert (overall["task"], overall["dataset"]) == (expected["task"], expected["dataset"])
    (metric,) = expected["metrics"]
    assert {**metric, "verified": False} == {"verified": False, **overall["metrics"][0]}
    no_eval = ModelCard(render_model_card(cfg, {"steps": 20}))
    assert "model-index" not in no_eval.data.to_dict()  # nothing measured: no results, no empty index


def _model_folder(folder: Path, card: str | None = None, config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bloom", **(config or {})}))
    if card is not None:
        (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def test_base_model_and_license_come_from_what_the_model_folder_names(tmp_path):
    def card_of(model: Path, **flags):
        card, _, _ = _hub_validated(render_model_card(RunConfig.load(model=str(model), **flags), MIX_FIGURES))
        return card

    cached = _model_folder(tmp_path / "hub" / "models--Langboat--bloom-389m-zh" / "snapshots" / "a1b2c3")
    card = card_of(cached)  # a hub download: the cache's folder names it; its family's license
    assert card.data.base_model == "Langboat/bloom-389m-zh" and card.data.license == "bigscience-bloom-rail-1.0"
    assert "pre-trained further from [Langboat/bloom-389m-zh]" in card.text
    v4_config = _model_folder(tmp_path / "m1", config={"_name_or_path": "Langboat/bloom-1b4-zh"})
    assert card_of(v4_config).data.base_model == "Langboat/bloom-1b4-zh"
    own_card = _model_folder(
        tmp_path / "m2", card="---\nlicense: apache-2.0\nmodel-index:\n- name: team/base\n  results: []\n---\n"
    )
    card = card_of(own_card)
    assert (card.data.base_model, card.data.license) == ("team/base", "apache-2.0")
    assert card_of(own_card, license="mit", base_model="a/b").data.license == "mit"  # the flags win
    other = _model_folder(
        tmp_path / "m3", card="---\nlicense: other\nlicense_name: team-license\nlicense_link: LICENSE\n---\n"
    )
    meta = card_of(other).data.to_dict()
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "team-license", "LICENSE")
    meta = card_of(tmp_path / "missing", license="other", license_name="x", license_link="https://x.org/l").data
    assert (meta.license_name, meta.license_link) == ("x", "https://x.org/l")
    local = _model_folder(tmp_path / "m4", config={"_name_or_path": str(tmp_path / "m1")})  # a path, not a hub id
    meta = card_of(local).data.to_dict()
    assert "base_model" not in meta and (meta["license"], meta["license_name"]) == ("other", "unspecified")


def test_push_writes_the_repository_into_the_usage_snippet_and_the_model_index(tmp_path):
    from job.run.model_card import USAGE_REPO, card_for_repo

    text = render_model_card(RunConfig.load(output_dir=str(tmp_path / "run")), MIX_FIGURES)
    assert f'from_pretrained("{USAGE_REPO}")' in text
    pushed, name, _ = _hub_validated(card_for_repo(text, "team/bloom-zh-news"))
    assert name == "team/bloom-zh-news" and USAGE_REPO not in pushed.text
    assert 'AutoModelForCausalLM.from_pretrained("team/bloom-zh-news")' in pushed.text
