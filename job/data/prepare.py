"""Tokenize, end every document with eos, pack or truncate, and cache the result by content.

Runs on CPUs, once, before any GPU process starts (a rank that tokenizes inside a collective makes
the others time out). The output folder is a `DatasetDict.save_to_disk` with splits `train` and
`eval` (column `input_ids`) plus `stats.json`; its name is a hash of everything that shapes it, so
a second identical run tokenizes nothing. `load_prepared` reads it memory-mapped.

Layouts:
- packing (default): documents, each followed by its eos, joined and cut into rows of `max_length`;
  the stream restarts every `BLOCK_DOCUMENTS` documents, whose last partial row is kept. Document
  boundaries stay recoverable from the eos tokens, which the model's attention uses to keep each token
  inside its own document.
- truncation: one document per row; one that does not fit is cut to `max_length` and gets no eos
  (it never ended there).

At corpus scale: the tokenizer runs in every usable CPU (`--num-proc` overrides), each process on whole
map batches written to disk; the layout then streams those one batch at a time, so memory does not grow
with the corpus. `--shard I/N` lays out only shard I's blocks (of every split) into a subfolder, so that
N machines share the work on one volume; the one that completes the set writes the index (`shards.json`,
the summed `stats.json`, the key), and the set is the rows, order and stats of one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from job.core.config import RunConfig, cache_root
from job.core.errors import JobError, stops_through_pools
from job.core.files import FileLock, atomic_write_json, new_folder, share
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
STAGING = ".staging-"  # `.NAME.staging-XXXX`: the only folders next to a target that prepare ever deletes
SHARDS_FILE = "shards.json"  # the index of a sharded dataset: its shard folders, in order


@dataclass
class Prepared:
    path: Path
    stats: dict[str, Any]
    cache_hit: bool

    def load(self):
        return load_prepared(str(self.path))


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the documents of its blocks, in every split (`--shard I/N`)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, slash, count = text.partition("/")
        if not (slash and index.strip().isdigit() and count.strip().isdigit() and int(count) >= 1):
            raise JobError(f"--shard {text!r} is not I/N", "pass the shard's index and count, e.g. --shard 0/4")
        shard = cls(int(index), int(count))
        if shard.index >= shard.count:
            raise JobError(
                f"--shard {text} is out of range", f"shard indices run from 0 to {shard.count - 1} (0 to N-1)"
            )
        return shard

    @property
    def name(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def folder(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def documents(self, documents: int) -> range:
        """The documents of a split this shard lays out: whole blocks, so that the shards' rows in order are the
        rows of one process."""
        blocks = -(-documents // BLOCK_DOCUMENTS)
        first, end = blocks * self.index // self.count, blocks * (self.index + 1) // self.count
        return range(first * BLOCK_DOCUMENTS, min(documents, end * BLOCK_DOCUMENTS))


_SHARD_FOLDER = re.compile(r"shard-(\d{5})-of-(\d{5})")


def prepare(
    cfg: RunConfig, tokenizer, output: str | None = None, corpus: Corpus | None = None, shard: Shard | None = None
) -> Prepared:
    """Prepare `cfg.data` (or an already loaded `corpus`) with `tokenizer` into `output` (default: the cache).

    With `shard`, only that shard, into a subfolder; the one that completes the set writes the index (the whole
    dataset's key and stats, and the shards in order), which makes the folder one prepared dataset: the rows and
    stats of one process.
    """
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
    done = _existing(target, key, shard)  # refusals before anything is written (even the lock file)
    if done:
        return done
    if shard is None:
        return _prepare_once(target, key, lambda staging: _write(staging, corpus, cfg, tokenizer, key))
    shard_key = {**key, "shard": shard.name}
    part = _prepare_once(
        target / shard.folder, shard_key, lambda staging: _write(staging, corpus, cfg, tokenizer, shard_key, shard)
    )
    return _assemble(target, key, shard.count) or part


def _prepare_once(target: Path, key: dict, write) -> Prepared:
    """`write` a staging folder that then becomes `target`, unless another process did it meanwhile."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A lock next to the target (a shared cache volume: every node sees it); several processes or nodes on one
    # key: one writes, the others wait and reuse. The kernel releases it when its holder dies.
    with FileLock(target.parent / f".{target.name}.lock"):
        done = _existing(target, key)
        if done:
            return done
        for stale in target.parent.glob(f".{target.name}{STAGING}*"):  # ours, left by a killed prepare
            shutil.rmtree(stale, ignore_errors=True)  # (its writer held this lock: it is gone)
        staging = new_folder(target.parent, f".{target.name}{STAGING}")
        try:
            stats = write(staging)
            if target.exists():
                target.rmdir()  # empty, checked above
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return Prepared(target, stats, cache_hit=False)


def _existing(target: Path, key: dict, shard: Shard | None = None) -> Prepared | None:
    """The data already prepared at `target` for this key; None if there is none; refuse anything else there
    (with `shard`: anything but shards of the same set)."""
    if target.exists() and not target.is_dir():
        raise JobError(f"{target} is a file", "choose a new or empty --output folder")
    if (target / KEY_FILE).exists():
        if json.loads((target / KEY_FILE).read_text()) == key:
            return Prepared(target, json.loads((target / STATS_FILE).read_text()), cache_hit=True)
        raise JobError(
            f"{target} holds data prepared with other settings",
            "choose another --output, or delete that folder to re-prepare",
        )
    if not target.exists() or not any(target.iterdir()):
        return None
    if shard is None and not any(_SHARD_FOLDER.fullmatch(p.name) for p in target.iterdir()):
        raise JobError(f"{target} exists and is not a prepared dataset", "choose an empty or new --output folder")
    count, present = _shards(target, key, shard.count if shard else None)
    if shard is None:  # one process on a folder of shards: it is done when they are all there, else refused
        return _assemble(target, key, count) or _missing(target, count, present)
    return None


def _shards(target: Path, key: dict, count: int | None) -> tuple[int, set[int]]:
    """The shard count of the set at `target` and the shards present; refuse an extra or foreign one."""
    present = set()
    for item in sorted(target.iterdir()):
        if item.name.startswith(".") or item.name in (KEY_FILE, STATS_FILE, SHARDS_FILE):  # ours: locks, staging, index
            continue
        match = _SHARD_FOLDER.fullmatch(item.name)
        if not match:
            raise JobError(
                f"{target} holds {item.name}, which is not a shard of a prepared dataset",
                "choose an empty or new --output folder",
            )
        index, of = int(match[1]), int(match[2])
        count = count or of
        if of != count or index >= of:
            raise JobError(
                f"{target} holds shard {index}/{of}, which is not one of {count} shards",
                f"prepare all {of} shards with --shard I/{of}, or delete {item} (another sharding)",
            )
        theirs = json.loads((item / KEY_FILE).read_text()) if (item / KEY_FILE).exists() else {}
        ours = {**key, "shard": f"{index}/{of}"}
        if theirs != ours:
            differ = sorted(k for k in ours if theirs.get(k) != ours[k]) or ["everything"]
            raise JobError(
                f"shard {index}/{of} in {target} was prepared with another {', '.join(differ)}",
                f"delete {item} and prepare it again with this corpus, tokenizer and layout",
            )
        present.add(index)
    return count, present


def _missing(target: Path, count: int, present: set[int]):
    missing = sorted(set(range(count)) - present)
    listed = ", ".join(f"{i}/{count}" for i in missing[:8]) + (" ..." if len(missing) > 8 else "")
    raise JobError(
        f"{target} lacks {len(missing)} of its {count} shards ({listed})",
        f"run prepare --shard I/{count} for each missing I (the Indexed Job does all of them)",
    )


def _assemble(target: Path, key: dict, count: int) -> Prepared | None:
    """Write the index of the set at `target` once every shard is there (the stats: the shards' sums)."""
    with FileLock(target / f".index-{count}.lock"):
        if (target / KEY_FILE).exists():
            return _existing(target, key)
        _, present = _shards(target, key, count)
        if len(present) < count:
            return None
        folders = [Shard(i, count).folder for i in range(count)]
        parts = [json.loads((target / f / STATS_FILE).read_text()) for f in folders]
        stats = {k: v for k, v in parts[0].items() if k not in STAT_KEYS and k not in ("train", "eval")}
        for split in ("train", "eval"):
            if any(split in p for p in parts):
                stats[split] = {k: sum(p.get(split, {}).get(k, 0) for p in parts) for k in STAT_KEYS}
        stats.update({k: sum(p[k] for p in parts) for k in STAT_KEYS})
        atomic_write_json(target / SHARDS_FILE, {"shards": folders})
        atomic_write_json(target / STATS_FILE, stats)
        atomic_write_json(target / KEY_FILE, key)  # written last: marks it complete
    return Prepared(target, stats, cache_hit=False)


def load_prepared(path: str):
    """The prepared DatasetDict at `path`, memory-mapped: one `save_to_disk` folder, or a set of shards whose splits
    are concatenated in shard order (no copy)."""
    import datasets

    read_prepared_stats(path)
    folder = Path(path)
    if not (folder / SHARDS_FILE).exists():
        return datasets.load_from_disk(str(folder))
    key = json.loads((folder / KEY_FILE).read_text())
    shards = json.loads((folder / SHARDS_FILE).read_text())["shards"]
    count, present = _shards(folder, key, len(shards))
    if len(present) < count:
        _missing(folder, count, present)
    parts = [datasets.load_from_disk(str(folder / name)) for name in shards]
    return datasets.DatasetDict(
        {
            split: datasets.concatenate_datasets([p[split] for p in parts if split in p])
            for split in ("train", "eval")
            if any(split in p for p in parts)
        }
    )


def _write(staging: Path, corpus: Corpus, cfg: RunConfig, tokenizer, key: dict, shard: Shard | None = None) -> dict:
    """Tokenize and lay out into `staging` (a reader sees the renamed folder whole or nothing); its stats."""
    splits, stats = _tokenize_and_layout(corpus.rows, cfg, tokenizer, staging, shard)
    stats["corpus"] = corpus.name
    splits.save_to_disk(str(staging / "data"), num_proc=None)
    for name in list(staging.iterdir()):
        if name.name != "data":  # the map's and the layout's intermediate files
            shutil.rmtree(name) if name.is_dir() else name.unlink()
    for item in (staging / "data").iterdir():
        item.rename(staging / item.name)
    (staging / "data").rmdir()
    (staging / STATS_FILE).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    (staging / KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")  # written last: marks it complete
    share(staging)
    return stats


def read_prepared_key(path: str) -> dict[str, Any]:
    """What a prepared folder was made from (corpus and tokenizer fingerprints, layout)."""
    read_prepared_stats(path)
    return json.loads((Path(path) / KEY_FILE).read_text())


def read_prepared_stats(path: str) -> dict[str, Any]:
    folder = Path(path)
    if not (folder / KEY_FILE).exists():
        shards = [m for p in folder.glob("shard-*") if (m := _SHARD_FOLDER.fullmatch(p.name))]
        if shards:
            _missing(folder, int(shards[0][2]), {int(m[1]) for m in shards})
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

    def encode(batch: dict[str, list], one_thread: bool = False) -> pa.Table:
        if one_thread:  # one of N worker processes: one tokenizer thread, not N threads in each of N processes
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the Rust tokenizer at each call
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


def _tokenize_and_layout(rows, cfg: RunConfig, tokenizer, workdir: Path, shard: Shard | None = None):
    import datasets

    eos = tokenizer.eos_token_id
    encode = _encoder(tokenizer, cfg.max_length, cfg.packing)
    held_out = _held_out_count(len(rows), cfg.eval_fraction)
    order = rows.train_test_split(test_size=held_out, seed=cfg.seed, shuffle=True) if held_out else {"train": rows}
    splits, stats = {}, {"max_length": cfg.max_length, "packing": cfg.packing, "eos_token_id": eos}
    for name, part in (("train", order["train"]), ("eval", order.get("test"))):
        if part is None:
            continue
        if shard is not None:
            part = part.select(shard.documents(len(part)))
        if len(part) == 0:  # a shard with no block of this split
            stats[name] = dict.fromkeys(STAT_KEYS, 0)
            continue
        processes = tokenize_processes(cfg, len(part))
        with stops_through_pools():
            tokenized = part.map(  # documents -> token ids + eos, in `processes` contiguous pieces, to a file on disk
                encode,
                batched=True,
                batch_size=MAP_BATCH,
                num_proc=processes if processes > 1 else None,
                fn_kwargs={"one_thread": processes > 1},
                remove_columns=part.column_names,
                cache_file_name=str(workdir / f"{name}-tokenized.arrow"),
                features=datasets.Features({"input_ids": _ids_feature(), "doc_length": datasets.Value("int64")}),
                desc=f"tokenize {name}",
            )
        path = workdir / f"{name}-rows.arrow"
        files = [f["filename"] for f in tokenized.cache_files]  # in row order
        stats[name] = _layout(files, cfg.max_length, cfg.packing, eos, path)
        splits[name] = datasets.Dataset.from_file(str(path))  # memory-mapped
    totals = {k: sum(s[k] for s in (stats["train"], stats.get("eval", {})) if s) for k in STAT_KEYS}
    stats.update(totals)
    return datasets.DatasetDict(splits), stats


def _layout(files: list[str], max_length: int, packing: bool, eos: int, path: Path) -> dict[str, int]:
    """Write the rows of at most `max_length` tokens of the documents in the map's Arrow `files` (token ids with
    their eos, one document a row, in order) to the Arrow file `path`, one batch at a time; the split's stats.

    Memory is one batch, whatever the corpus: the files are read, not memory-mapped (a map keeps every page it
    touched resident: the whole tokenized split by the end), and packing carries only the partial row over to the
    next batch. The stream restarts every `BLOCK_DOCUMENTS` documents (that block's last, partial row is kept), so
    a block's rows depend on its documents alone: any contiguous run of blocks is laid out the same by whoever
    lays it out.
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

    carry = np.empty(0, np.int32)
    with ArrowWriter(features=datasets.Features({"input_ids": _ids_feature()}), path=str(path)) as writer:
        for whole in _record_batches(files):
            start = 0
            while start < whole.num_rows:  # the part of this batch up to the end of its block
                batch = whole.slice(start, BLOCK_DOCUMENTS - stats["documents"] % BLOCK_DOCUMENTS)
                start += batch.num_rows
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
                if stats["documents"] % BLOCK_DOCUMENTS == 0 and len(carry):  # the block's partial row is kept
                    emit(carry, np.array([0, len(carry)], np.int32))
                    carry = carry[:0]
        if len(carry):
            emit(carry, np.array([0, len(carry)], np.int32))
        writer.finalize()
    return stats


def _record_batches(files: list[str]):
    """The record batches of Arrow stream files, in order, each read into memory when its turn comes."""
    import pyarrow as pa

    for name in files:
        with pa.OSFile(name) as source:
            yield from pa.ipc.open_stream(source)


def _ids_feature():
    import datasets

    return datasets.List(datasets.Value("int32"))


def _held_out_count(documents: int, fraction: float) -> int:
    if fraction <= 0 or documents < 2:
        return 0
    return min(documents - 1, max(1, round(documents * fraction)))
