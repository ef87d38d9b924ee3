"""Tokenize, end every document with eos, pack or truncate, and cache the result by content.

Runs on CPUs, once, before any GPU process starts (a rank that tokenizes inside a collective makes
the others time out). The output folder is a `DatasetDict.save_to_disk` with splits `train` and
`eval` (column `input_ids`) plus `stats.json`; its name is a hash of everything that shapes it, so
a second identical run tokenizes nothing.

Layouts:
- packing (default): documents, each followed by its eos, joined and cut into rows of `max_length`;
  the last partial row is kept. Document boundaries stay recoverable from the eos tokens, which the
  model's attention uses to keep each token inside its own document.
- truncation: one document per row; one that does not fit is cut to `max_length` and gets no eos
  (it never ended there).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from job.core.config import RunConfig, cache_root
from job.core.errors import JobError
from job.core.files import FileLock, new_folder, share
from job.core.topology import usable_cpus
from job.data.corpus import TEXT, Corpus, load_corpus
from job.data.tokenizer import tokenizer_fingerprint

LAYOUT_VERSION = 2  # part of the cache key: bump when the stored layout changes (2: packing restarts per block)
MAP_BATCH = 1000  # documents per tokenizer call and per layout step: what bounds prepare's memory
BLOCK_DOCUMENTS = 10_000  # packing restarts every N documents (see `_layout`)
STAT_KEYS = (
    "documents",
    "tokens",  # eos included
    "eos_tokens",
    "rows",
    "padding_tokens",  # what padding every row to max_length would add (actual padding is per batch)
    "truncated_documents",
    "document_tokens",  # text tokens before eos and truncation
)
KEY_FILE = "prepare_key.json"
STATS_FILE = "stats.json"


@dataclass
class Prepared:
    path: Path
    stats: dict[str, Any]
    cache_hit: bool

    def load(self):
        import datasets

        return datasets.load_from_disk(str(self.path))


def prepare(cfg: RunConfig, tokenizer, output: str | None = None, corpus: Corpus | None = None) -> Prepared:
    """Prepare `cfg.data` (or an already loaded `corpus`) with `tokenizer` into `output` (default: the cache)."""
    corpus = corpus or load_corpus(cfg.data, cfg.text_column, cfg.max_samples)
    key = {
        "layout_version": LAYOUT_VERSION,
        "corpus": corpus.fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        "eval_fraction": cfg.eval_fraction,
        "seed": cfg.seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    target = Path(output) if output else cache_root() / "prepared" / f"{corpus.name}-{digest}"
    done = _existing(target, key)  # refusals before anything is written (even the lock file)
    if done:
        return done
    target.parent.mkdir(parents=True, exist_ok=True)
    # A lock next to the target (a shared cache volume: every node sees it); several processes or nodes on one
    # key: one writes, the others wait and reuse. The kernel releases it when its holder dies.
    with FileLock(target.parent / f".{target.name}.lock"):
        done = _existing(target, key)
        if done:
            return done
        for stale in target.parent.glob(f".{target.name}{STAGING}*"):  # ours, left by a killed prepare
            shutil.rmtree(stale, ignore_errors=True)  # (its writer held this lock: it is gone)
        stats = _write(target, corpus, cfg, tokenizer, key)
    return Prepared(target, stats, cache_hit=False)


def _existing(target: Path, key: dict) -> Prepared | None:
    """The data already prepared at `target` for this key; None if there is none; refuse anything else there."""
    if target.exists() and not target.is_dir():
        raise JobError(f"{target} is a file", "choose a new or empty --output folder")
    if (target / KEY_FILE).exists():
        if json.loads((target / KEY_FILE).read_text()) == key:
            return Prepared(target, json.loads((target / STATS_FILE).read_text()), cache_hit=True)
        raise JobError(
            f"{target} holds data prepared with other settings",
            "choose another --output, or delete that folder to re-prepare",
        )
    if target.exists() and any(target.iterdir()):
        raise JobError(f"{target} exists and is not a prepared dataset", "choose an empty or new --output folder")
    return None


STAGING = ".staging-"  # `.NAME.staging-XXXX`: the only folders next to a target that prepare ever deletes


def _write(target: Path, corpus: Corpus, cfg: RunConfig, tokenizer, key: dict) -> dict:
    """Tokenize into a staging folder, then rename it into place (a reader sees all of it or nothing)."""
    staging = new_folder(target.parent, f".{target.name}{STAGING}")
    try:
        splits, stats = _tokenize_and_layout(corpus.rows, cfg, tokenizer, staging)
        stats["corpus"] = corpus.name
        splits.save_to_disk(str(staging / "data"), num_proc=None)
        for name in list(staging.iterdir()):
            if name.name != "data":  # the map's intermediate cache files
                shutil.rmtree(name) if name.is_dir() else name.unlink()
        for item in (staging / "data").iterdir():
            item.rename(staging / item.name)
        (staging / "data").rmdir()
        (staging / STATS_FILE).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
        (staging / KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")  # written last: marks it complete
        share(staging)
        if target.exists():
            target.rmdir()  # empty, checked above
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stats


def read_prepared_key(path: str) -> dict[str, Any]:
    """What a prepared folder was made from (corpus and tokenizer fingerprints, layout)."""
    read_prepared_stats(path)
    return json.loads((Path(path) / KEY_FILE).read_text())


def read_prepared_stats(path: str) -> dict[str, Any]:
    folder = Path(path)
    if not (folder / KEY_FILE).exists():
        raise JobError(f"{folder} is not a prepared dataset", "create it with `python -m job prepare --output DIR`")
    return json.loads((folder / STATS_FILE).read_text())


def token_ids_function(tokenizer):
    """texts -> token ids without specials, where a literal "</s>" in the text is text, never a second eos.

    A fast tokenizer is called through a private copy of its Rust tokenizer (`encode_batch_fast`: no offsets,
    no transformers `BatchEncoding`), which gives the same ids as `tokenizer(texts, add_special_tokens=False,
    split_special_tokens=True)`, what any other tokenizer gets.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return lambda texts: tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    from tokenizers import Tokenizer

    rust = Tokenizer.from_str(backend.to_str())
    rust.no_truncation()
    rust.no_padding()
    rust.encode_special_tokens = True
    return lambda texts: [e.ids for e in rust.encode_batch_fast(texts, add_special_tokens=False)]


def _encoder(tokenizer, max_length: int, packing: bool):
    """The batched map function: texts -> an Arrow table of rows (`input_ids`) and document lengths."""
    import pyarrow as pa

    token_ids = token_ids_function(tokenizer)
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list]) -> pa.Table:
        docs = token_ids(batch[TEXT])
        lengths = pa.array([len(d) for d in docs], pa.int64())
        if not packing:  # one row each: a document that does not fit is cut and gets no eos (it never ended there)
            docs = [d if len(d) < max_length else d[:max_length] for d in docs]
        ids = pa.array(docs, pa.list_(pa.int32()))  # one C++ pass over the lists, then numpy without copies
        starts_and_ends = ids.offsets.to_numpy()
        ends = starts_and_ends[1:]
        ended = np.ones(len(docs), bool) if packing else np.diff(starts_and_ends) < max_length
        values = np.insert(ids.values.to_numpy(), ends[ended], np.int32(eos))  # eos right after its document
        offsets = np.concatenate([[0], ends + np.cumsum(ended)]).astype(np.int32)
        rows = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        return pa.table({"input_ids": rows, "doc_length": lengths})

    return encode


def tokenize_processes(cfg: RunConfig, documents: int | None = None) -> int:
    """`--num-proc`, else every usable CPU; never more than the map has batches (a process for nothing costs a fork)."""
    processes = cfg.num_proc or usable_cpus()
    return processes if documents is None else max(1, min(processes, -(-documents // MAP_BATCH)))


def _tokenize_and_layout(rows, cfg: RunConfig, tokenizer, workdir: Path):
    import datasets

    eos = tokenizer.eos_token_id
    encode = _encoder(tokenizer, cfg.max_length, cfg.packing)
    held_out = _held_out_count(len(rows), cfg.eval_fraction)
    order = rows.train_test_split(test_size=held_out, seed=cfg.seed, shuffle=True) if held_out else {"train": rows}
    splits, stats = {}, {"max_length": cfg.max_length, "packing": cfg.packing, "eos_token_id": eos}
    for name, part in (("train", order["train"]), ("eval", order.get("test"))):
        if part is None:
            continue
        processes = tokenize_processes(cfg, len(part))
        tokenized = part.map(  # documents -> token ids + eos, in `processes` contiguous pieces, to a file on disk
            encode,
            batched=True,
            batch_size=MAP_BATCH,
            num_proc=processes if processes > 1 else None,
            remove_columns=part.column_names,
            cache_file_name=str(workdir / f"{name}-tokenized.arrow"),
            features=datasets.Features({"input_ids": _ids_feature(), "doc_length": datasets.Value("int64")}),
            desc=f"tokenize {name}",
        )
        path = workdir / f"{name}-rows.arrow"
        stats[name] = _layout(tokenized.data.table, cfg.max_length, cfg.packing, eos, path)
        splits[name] = datasets.Dataset.from_file(str(path))  # memory-mapped
    totals = {k: sum(s[k] for s in (stats["train"], stats.get("eval", {})) if s) for k in stats["train"]}
    stats.update(totals)
    return datasets.DatasetDict(splits), stats


def _layout(documents, max_length: int, packing: bool, eos: int, path: Path) -> dict[str, int]:
    """Write the rows of at most `max_length` tokens of `documents` (a memory-mapped table of token ids with their
    eos, one document a row) to the Arrow file `path`, one map batch at a time, and return the split's stats.

    Memory is one batch, whatever the corpus: packing carries only the partial row over to the next batch. The
    stream restarts every `BLOCK_DOCUMENTS` documents (that block's last, partial row is kept), so a block's rows
    depend on its documents alone: any contiguous run of blocks is laid out the same by whoever lays it out.
    """
    import datasets
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    stats = dict.fromkeys(STAT_KEYS, 0)

    def emit(values: np.ndarray, offsets: np.ndarray) -> None:
        rows = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
        writer.write_table(pa.table({"input_ids": rows}))
        stats["rows"] += len(offsets) - 1
        stats["padding_tokens"] += (len(offsets) - 1) * max_length - len(values)

    with ArrowWriter(features=datasets.Features({"input_ids": _ids_feature()}), path=str(path)) as writer:
        for block in range(0, documents.num_rows, BLOCK_DOCUMENTS):
            carry = np.empty(0, np.int32)
            for batch in documents.slice(block, BLOCK_DOCUMENTS).to_batches(max_chunksize=MAP_BATCH):
                ids = batch.column("input_ids")
                values = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
                lengths = batch.column("doc_length").to_numpy()
                stats["documents"] += len(lengths)
                stats["tokens"] += len(values)  # eos included
                stats["eos_tokens"] += int(np.count_nonzero(values == eos))
                stats["document_tokens"] += int(lengths.sum())  # text tokens before eos and truncation
                if not packing:  # the encoder's rows are the layout: one (cut) document each
                    stats["truncated_documents"] += int(np.count_nonzero(lengths + 1 > max_length))
                    starts = ids.offsets.to_numpy()
                    emit(values, (starts - starts[0]).astype(np.int32))
                    continue
                stream = np.concatenate([carry, values])
                full = len(stream) - len(stream) % max_length
                if full:
                    emit(stream[:full], np.arange(0, full + 1, max_length, dtype=np.int32))
                carry = stream[full:]
            if len(carry):  # the block's partial row is kept
                emit(carry, np.array([0, len(carry)], np.int32))
        writer.finalize()
    return stats


def _ids_feature():
    import datasets

    return datasets.List(datasets.Value("int32"))


def _held_out_count(documents: int, fraction: float) -> int:
    if fraction <= 0 or documents < 2:
        return 0
    return min(documents - 1, max(1, round(documents * fraction)))
