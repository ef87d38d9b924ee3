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
from job.data.corpus import TEXT, Corpus, load_corpus
from job.data.tokenizer import tokenizer_fingerprint

LAYOUT_VERSION = 1  # part of the cache key: bump when the stored layout changes
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


def _tokenize_and_layout(rows, cfg: RunConfig, tokenizer, workdir: Path):
    import datasets

    eos = tokenizer.eos_token_id
    max_length = cfg.max_length
    packing = cfg.packing
    encode = _encoder(tokenizer, max_length, packing)

    held_out = _held_out_count(len(rows), cfg.eval_fraction)
    order = rows.train_test_split(test_size=held_out, seed=cfg.seed, shuffle=True) if held_out else {"train": rows}
    splits, stats = {}, {"max_length": max_length, "packing": packing, "eos_token_id": eos}
    for name, part in (("train", order["train"]), ("eval", order.get("test"))):
        if part is None:
            continue
        tokenized = part.map(
            encode,
            batched=True,
            batch_size=1000,
            num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
            remove_columns=part.column_names,
            cache_file_name=str(workdir / f"{name}-tokenized.arrow"),
            features=datasets.Features(
                {"input_ids": datasets.List(datasets.Value("int32")), "doc_length": datasets.Value("int64")}
            ),
            desc=f"tokenize {name}",
        )
        splits[name], stats[name] = _layout(tokenized, max_length, packing, eos)
    totals = {k: sum(s[k] for s in (stats["train"], stats.get("eval", {})) if s) for k in stats["train"]}
    stats.update(totals)
    return datasets.DatasetDict(splits), stats


def _layout(tokenized, max_length: int, packing: bool, eos: int):
    """Rows of at most `max_length` tokens, and the split's stats."""
    import datasets
    import pyarrow as pa

    column = tokenized.data.column("input_ids").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    doc_lengths = tokenized.data.column("doc_length").to_numpy()
    if packing:  # cut the joined stream into rows; the final partial row is kept
        offsets = np.append(np.arange(0, len(flat), max_length), len(flat)).astype(np.int32)
        rows = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        table = pa.table({"input_ids": rows})
    else:
        table = pa.table({"input_ids": column.cast(pa.list_(pa.int32()))})
    row_lengths = np.diff(table.column("input_ids").combine_chunks().offsets.to_numpy())
    stats = {
        "documents": len(doc_lengths),
        "tokens": len(flat),  # eos included
        "eos_tokens": int(np.count_nonzero(flat == eos)),
        "rows": len(row_lengths),
        # padding a batch would need if every row were padded to max_length (actual padding is per batch)
        "padding_tokens": int(len(row_lengths) * max_length - row_lengths.sum()),
        "truncated_documents": 0 if packing else int(np.count_nonzero(doc_lengths + 1 > max_length)),
        "document_tokens": int(doc_lengths.sum()),  # text tokens before eos and truncation
    }
    return datasets.Dataset(table), stats


def _held_out_count(documents: int, fraction: float) -> int:
    if fraction <= 0 or documents < 2:
        return 0
    return min(documents - 1, max(1, round(documents * fraction)))
