"""Tokenize, end every document with eos, pack or truncate, and cache the result by content.

Runs on CPUs, once, before any GPU process starts (a rank that tokenizes inside a collective makes
the others time out). The output folder holds one Arrow file per split, `train.arrow` and `eval.arrow`
(column `input_ids`), plus `stats.json`; its name is a hash of everything that shapes it, so a second
identical run tokenizes nothing. `load_prepared` reads it memory-mapped, as a DatasetDict.

Layouts:
- packing (default): documents, each followed by its eos, joined and cut into rows of `max_length`;
  the stream restarts every `BLOCK_DOCUMENTS` documents, whose last partial row is kept. Document
  boundaries stay recoverable from the eos tokens, which the model's attention uses to keep each token
  inside its own document.
- truncation: one document per row; one that does not fit is cut to `max_length` and gets no eos
  (it never ended there).

At corpus scale: the corpus is read in order, one batch at a time and without a memory map; the held-out
documents are a seeded random subset, so both splits stream in corpus order; the tokenizer runs in one thread
per usable CPU (`--num-proc` overrides) and each split's rows are written straight into their final file.
Memory does not grow with the corpus. `--shard I/N` lays out only shard I's blocks (of every split) into a
subfolder, so that N machines share the work on one volume; the one that completes the set writes the index
(`shards.json`, the summed `stats.json`, the key), and the set is the rows, order and stats of one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from job.core.config import RunConfig, cache_root
from job.core.errors import JobError, raise_if_disk_full
from job.core.files import FileLock, apply_umask, atomic_write_json, new_folder, refuse_link
from job.core.topology import usable_cpus
from job.data.corpus import Corpus, load_run_corpus
from job.data.tokenizer import tokenizer_fingerprint

log = logging.getLogger("job")

# part of the cache key: bump when the stored layout changes (2: packing restarts per block; 3: one Arrow file per
# split, written in place; held-out documents a seeded random subset, both splits in corpus order)
LAYOUT_VERSION = 3
TOKENIZE_BATCH = 1000  # documents per tokenizer call and per layout step: what bounds prepare's memory
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
SPLITS = ("train", "eval")  # each one Arrow file, SPLIT.arrow
# Each Arrow file's size and xxh3-128, checked before a prepared folder is used: the key file says what was prepared,
# not that the bytes are still those written. xxh3 reads about 6 GiB/s (0.17 s per GiB from the page cache on a
# 2-core test machine), so the whole file is hashed at every start; a cold volume makes it as slow as reading the
# file once.
CONTENTS_FILE = "contents.json"


@dataclass
class Prepared:
    path: Path
    stats: dict[str, Any]
    cache_hit: bool

    def load(self):
        return load_prepared(str(self.path))


SHARD_DIGITS = 5  # of a shard folder's index and count: the one source of the folder name, its pattern and the bound
MAX_SHARDS = 10**SHARD_DIGITS - 1


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
        if shard.count > MAX_SHARDS:
            raise JobError(
                f"--shard {text}: {shard.count} shards are more than {MAX_SHARDS:,}",
                f"use at most {MAX_SHARDS:,} shards",
            )
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
        return f"shard-{self.index:0{SHARD_DIGITS}d}-of-{self.count:0{SHARD_DIGITS}d}"

    def documents(self, documents: int) -> range:
        """The documents of a split this shard lays out: whole blocks, so that the shards' rows in order are the
        rows of one process."""
        blocks = -(-documents // BLOCK_DOCUMENTS)
        first, end = blocks * self.index // self.count, blocks * (self.index + 1) // self.count
        return range(first * BLOCK_DOCUMENTS, min(documents, end * BLOCK_DOCUMENTS))


_SHARD_FOLDER = re.compile(rf"shard-(\d{{{SHARD_DIGITS}}})-of-(\d{{{SHARD_DIGITS}}})")


def prepare(
    cfg: RunConfig, tokenizer, output: str | None = None, corpus: Corpus | None = None, shard: Shard | None = None
) -> Prepared:
    """Prepare `cfg.data` (or an already loaded `corpus`) with `tokenizer` into `output` (default: the cache).

    With `shard`, only that shard, into a subfolder; the one that completes the set writes the index (the whole
    dataset's key and stats, and the shards in order), which makes the folder one prepared dataset: the rows and
    stats of one process.
    """
    corpus = corpus or load_run_corpus(cfg)
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
    if not output:  # a name in the cache is the job's own: never a way out of it
        refuse_link(target, cache_root())
    if shard is not None:
        refuse_link(target / shard.folder, target)
    done = _existing(target, key, shard, rebuild=not output)  # refusals before anything is written (even the lock file)
    if done:
        return done
    if shard is None:
        write = lambda staging: _write(staging, corpus, cfg, tokenizer, key)
        return _prepare_once(target, key, write, rebuild=not output)
    shard_key = {**key, "shard": shard.name}
    part = _prepare_once(
        target / shard.folder, shard_key, lambda staging: _write(staging, corpus, cfg, tokenizer, shard_key, shard)
    )
    return _assemble(target, key, shard.count) or part


def _prepare_once(target: Path, key: dict, write, rebuild: bool = False) -> Prepared:
    """`write` a staging folder that then becomes `target`, unless another process did it meanwhile. `rebuild`: a
    damaged `target` (the job's own cache entry) is deleted and written again."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A lock next to the target (a shared cache volume: every node sees it); several processes or nodes on one
    # key: one writes, the others wait and reuse. The kernel releases it when its holder dies.
    with FileLock(target.parent / f".{target.name}.lock"):
        done = _existing(target, key, rebuild=rebuild)
        if done:
            return done
        if rebuild and (target / KEY_FILE).exists():  # damaged (checked above), and the cache's own
            shutil.rmtree(target)
        for stale in target.parent.glob(f".{target.name}{STAGING}*"):  # ours, left by a killed prepare
            if not stale.is_symlink():  # (its writer held this lock: it is gone); a link is not ours
                shutil.rmtree(stale, ignore_errors=True)
        staging = new_folder(target.parent, f".{target.name}{STAGING}")
        try:
            try:
                stats = write(staging)
            except OSError as e:
                raise_if_disk_full(e, target)
                raise
            if target.exists():
                target.rmdir()  # empty, checked above
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return Prepared(target, stats, cache_hit=False)


def _existing(target: Path, key: dict, shard: Shard | None = None, rebuild: bool = False) -> Prepared | None:
    """The data already prepared at `target` for this key, whole (`damage`); None if there is none (`rebuild`: or
    it is damaged); refuse anything else there (with `shard`: anything but shards of the same set)."""
    if target.exists() and not target.is_dir():
        raise JobError(f"{target} is a file", "choose a new or empty --output folder")
    if (target / KEY_FILE).exists():
        if json.loads((target / KEY_FILE).read_text()) == key:
            why = damage(target)
            if why and rebuild:
                log.warning("the cache entry %s is damaged (%s): it is prepared again", target, why)
                return None
            if why:
                raise _damaged(target, why)
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
        for split in SPLITS:
            if any(split in p for p in parts):
                stats[split] = {k: sum(p.get(split, {}).get(k, 0) for p in parts) for k in STAT_KEYS}
        stats.update({k: sum(p[k] for p in parts) for k in STAT_KEYS})
        atomic_write_json(target / SHARDS_FILE, {"shards": folders})
        atomic_write_json(target / STATS_FILE, stats)
        atomic_write_json(target / KEY_FILE, key)  # written last: marks it complete
    return Prepared(target, stats, cache_hit=False)


def load_prepared(path: str):
    """The prepared DatasetDict at `path` (splits `train` and, if any held out, `eval`; column `input_ids`),
    memory-mapped: one folder, or a set of shards whose splits are concatenated in shard order (no copy)."""
    import datasets

    layout = read_prepared_key(path).get("layout_version")
    if layout != LAYOUT_VERSION:  # an older job's folder: its files are not where this one reads
        raise JobError(
            f"{path} was prepared in layout {layout}; this version reads layout {LAYOUT_VERSION}",
            "prepare it again (python -m job prepare --output DIR) and pass that folder",
        )
    folder = Path(path)
    if not (folder / SHARDS_FILE).exists():
        check_contents(folder, hashes=False)  # the launcher hashed it; here the sizes, before pyarrow reads it
        return datasets.DatasetDict(_splits(folder))
    key = json.loads((folder / KEY_FILE).read_text())
    shards = json.loads((folder / SHARDS_FILE).read_text())["shards"]
    count, present = _shards(folder, key, len(shards))
    if len(present) < count:
        _missing(folder, count, present)
    check_contents(folder, hashes=False)
    parts = [_splits(folder / name) for name in shards]
    return datasets.DatasetDict(
        {
            split: datasets.concatenate_datasets([p[split] for p in parts if split in p])
            for split in SPLITS
            if any(split in p for p in parts)
        }
    )


def _splits(folder: Path) -> dict:
    """The split files of one prepared folder, memory-mapped (a split with no documents has no file)."""
    import datasets

    return {
        s: datasets.Dataset.from_file(str(folder / f"{s}.arrow")) for s in SPLITS if (folder / f"{s}.arrow").exists()
    }


def _write(staging: Path, corpus: Corpus, cfg: RunConfig, tokenizer, key: dict, shard: Shard | None = None) -> dict:
    """Tokenize and lay out into `staging` (a reader sees the renamed folder whole or nothing); its stats."""
    with _one_rust_thread_per_call():
        stats = _tokenize_and_layout(corpus, cfg, tokenizer, staging, shard)
    stats["corpus"] = corpus.name
    contents = {p.name: {"bytes": p.stat().st_size, "xxh3_128": _xxh3(p)} for p in sorted(staging.glob("*.arrow"))}
    (staging / CONTENTS_FILE).write_text(json.dumps(contents, indent=2) + "\n")
    (staging / STATS_FILE).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    (staging / KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")  # written last: marks it complete
    apply_umask(staging)
    return stats


def _xxh3(path: Path) -> str:
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def damage(path: str | Path, hashes: bool = True) -> str | None:
    """What in a prepared folder (each shard of a set) differs from what was written: a missing, resized or (with
    `hashes`) changed Arrow file; None when it is whole."""
    folder = Path(path)
    parts = [folder]
    if (folder / SHARDS_FILE).exists():
        parts = [folder / name for name in json.loads((folder / SHARDS_FILE).read_text())["shards"]]
    for part in parts:
        try:
            contents = json.loads((part / CONTENTS_FILE).read_text())
        except (OSError, ValueError):
            return f"{part / CONTENTS_FILE} is missing or unreadable (prepared by an older release?)"
        on_disk = {p.name for p in part.glob("*.arrow")}
        if on_disk != set(contents):
            return f"{part} holds {sorted(on_disk)}, not the {sorted(contents)} that were written"
        for name, written in contents.items():
            size = (part / name).stat().st_size
            if size != written["bytes"]:
                return f"{part / name} is {size} bytes, {written['bytes']} were written"
            if hashes and _xxh3(part / name) != written["xxh3_128"]:
                return f"{part / name} changed since it was written (its xxh3-128 differs)"
    return None


def check_contents(path: str | Path, hashes: bool = True) -> None:
    """One line for a prepared folder that is not whole (see `damage`)."""
    why = damage(path, hashes)
    if why:
        raise _damaged(path, why)


def _damaged(path: str | Path, why: str) -> JobError:
    return JobError(f"prepared data {path} is damaged: {why}", "prepare it again into a new folder and pass that")


@contextlib.contextmanager
def _one_rust_thread_per_call():
    """prepare's threads are the parallelism: each tokenizer call runs one Rust thread (TOKENIZERS_PARALLELISM is
    read at every call), not a rayon pool per thread; the caller's setting comes back afterwards."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


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
    """texts -> an Arrow table of rows (`input_ids`, each document with its eos) and document lengths."""
    import pyarrow as pa

    token_ids = token_ids_function(tokenizer)
    eos = tokenizer.eos_token_id

    def encode(texts: list[str]) -> pa.Table:
        docs = token_ids(texts)
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


def tokenizer_threads(cfg: RunConfig, documents: int | None = None) -> int:
    """`--num-proc`, else every usable CPU; never more than there are batches (a thread for nothing is idle)."""
    threads = cfg.num_proc or usable_cpus()
    return threads if documents is None else max(1, min(threads, -(-documents // TOKENIZE_BATCH)))


def _held_out(documents: int, count: int, seed: int) -> np.ndarray:
    """The positions of the `count` held-out documents: a seeded random subset, sorted (both splits then stream
    in corpus order)."""
    if not count:
        return np.empty(0, np.int64)
    return np.sort(np.random.default_rng(seed).choice(documents, count, replace=False))


def _tokenize_and_layout(corpus: Corpus, cfg: RunConfig, tokenizer, staging: Path, shard: Shard | None = None) -> dict:
    """Read the corpus in order, tokenize it in `tokenizer_threads` threads and lay each split out into its final
    file `staging/SPLIT.arrow`; the stats.

    Threads, not processes: the Rust tokenizer releases the GIL, so N threads keep N cores busy with nothing
    pickled, nothing forked, and a stop signal ends the one process at once. The batches are laid out in the
    order they were read; at most two per thread are in flight, so memory does not grow with the corpus.
    """
    held_out = _held_out(corpus.documents, _held_out_count(corpus.documents, cfg.eval_fraction), cfg.seed)
    sizes = {"train": corpus.documents - len(held_out), "eval": len(held_out)}
    wanted = {name: shard.documents(n) if shard else range(n) for name, n in sizes.items() if n}
    stats = {"max_length": cfg.max_length, "packing": cfg.packing, "eos_token_id": tokenizer.eos_token_id}
    encode = _encoder(tokenizer, cfg.max_length, cfg.packing)
    threads = tokenizer_threads(cfg, sum(len(r) for r in wanted.values()))
    layouts = {
        name: _Layout(staging / f"{name}.arrow", cfg.max_length, cfg.packing, tokenizer.eos_token_id)
        for name, r in wanted.items()
        if len(r)
    }
    pending: deque = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="tokenize") as pool:
        try:
            position = 0  # of the batch's first document in the corpus
            for texts in corpus.text_batches(TOKENIZE_BATCH):
                for name, part in _split(texts, position, held_out, wanted):
                    pending.append((name, pool.submit(encode, part)))
                position += len(texts)
                while len(pending) > 2 * threads or (pending and pending[0][1].done()):
                    name, done = pending.popleft()
                    layouts[name].add(done.result())
            while pending:
                name, done = pending.popleft()
                layouts[name].add(done.result())
        finally:  # a stop signal or an error: the batches not started are dropped, not tokenized
            for _, future in pending:
                future.cancel()
    for name in wanted:
        stats[name] = layouts[name].close() if name in layouts else dict.fromkeys(STAT_KEYS, 0)
    stats.update({k: sum(stats[name][k] for name in wanted) for k in STAT_KEYS})
    return stats


def _split(texts: list[str], position: int, held_out: np.ndarray, wanted: dict[str, range]):
    """(split, texts) for the documents of a batch that start at corpus `position` and that this prepare lays out:
    the held-out ones to eval, the others to train, each kept if its index within its split is `wanted`."""
    end = position + len(texts)
    first, last = np.searchsorted(held_out, [position, end])
    is_eval = np.zeros(len(texts), bool)
    is_eval[held_out[first:last] - position] = True
    for name, start, chosen in (("train", position - first, ~is_eval), ("eval", first, is_eval)):
        if name not in wanted:
            continue
        docs = [t for t, keep in zip(texts, chosen, strict=True) if keep]
        keep = range(max(start, wanted[name].start), min(start + len(docs), wanted[name].stop))
        if len(keep):
            yield name, docs[keep.start - start : keep.stop - start]


class _Layout:
    """Writes the rows of at most `max_length` tokens of a split's documents, given as the encoder's tables (token
    ids with their eos, one document a row, in order), to the Arrow file `path`, one table at a time; `close` gives
    the split's stats.

    Memory is one batch, whatever the corpus: packing carries only the partial row over to the next batch. The
    stream restarts every `BLOCK_DOCUMENTS` documents (that block's last, partial row is kept), so a block's rows
    depend on its documents alone: any contiguous run of blocks is laid out the same by whoever lays it out.
    """

    def __init__(self, path: Path, max_length: int, packing: bool, eos: int):
        import datasets
        from datasets.arrow_writer import ArrowWriter

        self.max_length, self.packing, self.eos = max_length, packing, eos
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.carry = np.empty(0, np.int32)
        self.writer = ArrowWriter(features=datasets.Features({"input_ids": _ids_feature()}), path=str(path))

    def _emit(self, values: np.ndarray, offsets: np.ndarray) -> None:
        import pyarrow as pa

        rows = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
        self.writer.write_table(pa.table({"input_ids": rows}))
        self.stats["rows"] += len(offsets) - 1
        self.stats["padding_tokens"] += (len(offsets) - 1) * self.max_length - len(values)

    def add(self, whole) -> None:
        stats, max_length = self.stats, self.max_length
        start = 0
        while start < whole.num_rows:  # the part of this batch up to the end of its block
            batch = whole.slice(start, BLOCK_DOCUMENTS - stats["documents"] % BLOCK_DOCUMENTS)
            start += batch.num_rows
            ids = batch.column("input_ids").combine_chunks()
            values = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            lengths = batch.column("doc_length").to_numpy()
            stats["documents"] += len(lengths)
            stats["tokens"] += len(values)  # eos included
            stats["eos_tokens"] += int(np.count_nonzero(values == self.eos))
            stats["document_tokens"] += int(lengths.sum())  # text tokens before eos and truncation
            if not self.packing:  # the encoder's rows are the layout: one (cut) document each
                stats["truncated_documents"] += int(np.count_nonzero(lengths + 1 > max_length))
                starts = ids.offsets.to_numpy()
                self._emit(values, (starts - starts[0]).astype(np.int32))
                continue
            stream = np.concatenate([self.carry, values])
            full = len(stream) - len(stream) % max_length
            if full:
                self._emit(stream[:full], np.arange(0, full + 1, max_length, dtype=np.int32))
            self.carry = stream[full:]
            if stats["documents"] % BLOCK_DOCUMENTS == 0 and len(self.carry):  # the block's partial row is kept
                self._emit(self.carry, np.array([0, len(self.carry)], np.int32))
                self.carry = self.carry[:0]

    def close(self) -> dict[str, int]:
        if len(self.carry):
            self._emit(self.carry, np.array([0, len(self.carry)], np.int32))
        self.writer.finalize()
        self.writer.close()
        return self.stats


def _ids_feature():
    import datasets

    return datasets.List(datasets.Value("int32"))


def _held_out_count(documents: int, fraction: float) -> int:
    if fraction <= 0 or documents < 2:
        return 0
    return min(documents - 1, max(1, round(documents * fraction)))
