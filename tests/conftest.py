"""Shared fixtures. Everything is built here, offline: a small tokenizer, small corpora, a private cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DOCS = [
    "昭通机场（ZPZT）是位于中国云南昭通的民用机场，始建于1935年。",
    "北京是中华人民共和国的首都。",
    "短",
    "这是一篇比较长的文章，" * 30,
    "文本里出现字面的 </s> 也只是文本。",
]

# ------------------------------------------------------------------- launch settings, no process started
KUBEFLOW_ENV = {  # what a PyTorchJob/TrainJob sets in the pod of node 2 of 4
    "PET_NNODES": "4",
    "PET_NODE_RANK": "2",
    "PET_MASTER_ADDR": "run-node-0-0.run",
    "PET_MASTER_PORT": "29400",
    "PET_NPROC_PER_NODE": "8",
}


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """The cache of the session's shared fixtures (module- and session-scoped ones run before any test's own), and
    the built-in BPEs every test's cache shares (content-addressed and read-only once trained)."""
    path = tmp_path_factory.mktemp("job-cache")
    (path / "tokenizers").mkdir()
    os.environ["JOB_CACHE"] = str(path)
    return path


def share_entries(source: Path, target: Path) -> None:
    """Hard-link into `target` each complete built-in BPE of `source` it lacks (training one takes ~30 s; a symbolic
    link would be refused by the job, which writes nothing through one)."""
    target.mkdir(exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.is_symlink() or not (entry / "tokenizer.json").is_file() or (target / entry.name).exists():
            continue
        staging = target / f".{entry.name}.sharing-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for file in entry.iterdir():
            os.link(file, staging / file.name)
        try:
            staging.rename(target / entry.name)
        except OSError:  # another worker's test shared it first
            shutil.rmtree(staging)


@pytest.fixture(autouse=True)
def restore_environ():
    """The job sets process-wide environment variables for what it starts (TensorBoard's folder, the log format,
    torchrun's rank variables): set by a test that runs it in-process, they must not reach the runs of the tests
    after it (a later run's TensorBoard events went to an earlier test's folder: make test-random, seed
    1452127507)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def job_cache(tmp_path_factory, session_cache, monkeypatch):
    """A cache private to each test: no test sees a prepared entry another test left, whatever the order (beside
    `tmp_path`, which stays the test's own). The built-in BPEs are shared both ways (`share_entries`)."""
    path = tmp_path_factory.mktemp("job-cache")
    share_entries(session_cache / "tokenizers", path / "tokenizers")
    monkeypatch.setenv("JOB_CACHE", str(path))
    yield path
    if (path / "tokenizers").is_dir() and not (path / "tokenizers").is_symlink():
        share_entries(path / "tokenizers", session_cache / "tokenizers")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 600-entry byte-level BPE with Bloom's specials, trained on a slice of the built-in corpus."""
    from job.data.corpus import builtin_articles
    from job.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer") / "tok"
    train_tokenizer(builtin_articles()[:300] + DOCS, 600, out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from job.data.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


def tiny_bloom_config(vocab: int, **overrides):
    """A small Bloom config with Bloom's special ids (bos 1, eos 2, pad 3); `overrides` change any field."""
    from transformers import BloomConfig

    values = dict(vocab_size=vocab, hidden_size=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return BloomConfig(**{**values, **overrides})


def tiny_bloom(vocab: int, seed: int = 0, **overrides):
    """A randomly initialised `tiny_bloom_config` model, the same weights for the same seed."""
    import torch
    from transformers import BloomForCausalLM

    torch.manual_seed(seed)
    return BloomForCausalLM(tiny_bloom_config(vocab, **overrides))


# ------------------------------------------------------------------- training runs started by the tests
# A tiny run the training tests share: 32-token rows, 4 x 2 examples a step, a learning rate that moves a tiny model
# visibly in a dozen steps, a loss every step, batches built in the training process (no DataLoader workers).
TINY_RUN = dict(
    max_length=32,
    per_device_batch_size=4,
    grad_accum=2,
    logging_steps=1,
    learning_rate="3e-3",
    warmup_steps=0,
    dataloader_workers=0,
)


def train_args(tiny: bool = True, **options) -> list[str]:
    """`train` and a `--name value` flag per keyword (underscores become dashes), TINY_RUN's first unless `tiny` is
    False (a run as a recipe sets it): later ones win."""
    flags = {**(TINY_RUN if tiny else {}), **options}
    return ["train", *(part for name, value in flags.items() for part in (f"--{name.replace('_', '-')}", str(value)))]


def launch_of(cfg, **launch_settings):
    """The launch `train` would resolve for `cfg` with these launch settings (nproc, nnodes, ...) and no
    environment."""
    import dataclasses

    from job.core.topology import resolve_topology
    from job.run.launch_record import resolve_launch

    return resolve_launch(resolve_topology(dataclasses.replace(cfg, **launch_settings), {})[0])


def complete_checkpoint(output: Path, step: int) -> Path:
    """`output/checkpoint-<step>` as a finished save of this job leaves it: Trainer state, then its COMPLETE marker."""
    from job.core import checkpoints

    checkpoints.begin(output, step)
    folder = output / f"checkpoint-{step}"
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 1000}))
    checkpoints.mark_complete(folder, step)
    return folder


def write_jsonl(path: Path, docs: list[str], column: str = "completion") -> Path:
    path.write_text(
        "".join(json.dumps({column: d, "source": "test"}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    return path


@pytest.fixture
def docs_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", DOCS)
