"""Every source becomes rows {"completion", "source"}; bad sources are one clear error."""

from __future__ import annotations

import json

import pytest

from job.core.errors import JobError
from job.data.corpus import builtin_articles, load_corpus
from tests.conftest import DOCS, write_jsonl


def test_builtin_corpus_is_untagged_articles():
    corpus = load_corpus(None)
    assert corpus.rows.column_names == ["completion", "source"]
    assert len(corpus.rows) > 3000
    text = "\n".join(builtin_articles()[:50])
    assert "/n " not in text and "/v " not in text and "/w" not in text  # word/tag tokens are stripped
    assert sum(len(t) for t in builtin_articles()) > 1_500_000


def test_jsonl_and_max_samples_keep_order(docs_jsonl):
    corpus = load_corpus(str(docs_jsonl), max_samples=3)
    assert corpus.rows["completion"][:] == DOCS[:3]
    assert load_corpus(str(docs_jsonl), max_samples=3).fingerprint == corpus.fingerprint
    assert load_corpus(str(docs_jsonl), max_samples=4).fingerprint != corpus.fingerprint


def test_save_to_disk_parquet_glob_and_other_column(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "a.parquet"))
    for source in (tmp_path / "disk", tmp_path / "dict", tmp_path / "a.parquet", tmp_path / "*.parquet"):
        rows = load_corpus(str(source), text_column="text").rows
        assert rows.column_names == ["completion", "source"]
        assert rows["completion"][:] == DOCS


def test_empty_texts_are_dropped(tmp_path):
    rows = load_corpus(str(write_jsonl(tmp_path / "d.jsonl", ["甲", "", "  ", "乙"]))).rows
    assert rows["completion"][:] == ["甲", "乙"]


@pytest.mark.parametrize(
    ("make", "column", "message"),
    [
        (lambda p: p / "missing.jsonl", "completion", "does not exist"),
        (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "completion", "is not a dataset"),
        (lambda p: write_jsonl(p / "d.jsonl", DOCS), "text", "its columns are: completion, source"),
        (lambda p: write_jsonl(p / "d.jsonl", []), "completion", "empty"),
        (lambda p: write_jsonl(p / "d.jsonl", ["", " "]), "completion", "every text in column"),
    ],
)
def test_bad_sources_are_clear_errors(tmp_path, make, column, message):
    with pytest.raises(JobError, match=message):
        load_corpus(str(make(tmp_path)), text_column=column)


def test_malformed_jsonl_line_and_non_utf8_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"completion": "好"}\n{"completion": \n', encoding="utf-8")
    with pytest.raises(JobError, match="line 2 is not a JSON object"):
        load_corpus(str(bad))
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes('{"completion": "好"}\n'.encode() + '{"completion": "中文"}\n'.encode("gbk"))
    with pytest.raises(JobError, match="line 2 is not UTF-8"):
        load_corpus(str(gbk))


def test_bom_and_gzip_are_read(tmp_path):
    import gzip

    lines = "".join(json.dumps({"completion": d}, ensure_ascii=False) + "\n" for d in DOCS)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    assert load_corpus(str(tmp_path / "bom.jsonl")).rows["completion"][:] == DOCS
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    assert load_corpus(str(tmp_path / "d.jsonl.gz")).rows["completion"][:] == DOCS
    assert load_corpus(str(tmp_path / "*.gz")).rows["completion"][:] == DOCS


def test_non_text_values_name_the_file_the_line_and_the_type(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"completion": {"a": 1}}) + "\n")
    with pytest.raises(JobError, match=r"d.jsonl line 6: 'completion' is a JSON object \(\{\"a\": 1\}\), not a string"):
        load_corpus(str(path))
    (tmp_path / "arr.json").write_text(json.dumps([{"completion": "甲"}, {"completion": 7}]))
    with pytest.raises(JobError, match=r"column 'completion' of arr.json is not text \(record 2 is int 7\)"):
        load_corpus(str(tmp_path / "arr.json"))
    import datasets

    datasets.Dataset.from_dict({"completion": [1, 2]}).to_parquet(str(tmp_path / "n.parquet"))
    with pytest.raises(JobError, match="make every 'completion' value a string, or pass the column holding the text"):
        load_corpus(str(tmp_path / "n.parquet"))


def _gzip(path, data: bytes):
    import gzip

    path.write_bytes(gzip.compress(data))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: write_jsonl(p / "plain.jsonl", DOCS).rename(p / "d.jsonl.gz"),
            r"d.jsonl.gz is named .gz but is not gzip",
        ),
        (
            lambda p: (
                (p / "d.jsonl.gz").write_bytes(_gzip(p / "x.gz", _lines(400)).read_bytes()[:2000]) and p / "d.jsonl.gz"
            ),
            r"d.jsonl.gz is a damaged gzip file: its data ends after line \d+",
        ),
        (
            lambda p: _write(p / "d.jsonl", b'{"completion": "a"}\n{"completion": "b", "completion": "c"}\n'),
            "d.jsonl line 2 has the key 'completion' twice",
        ),
        (
            lambda p: _write(p / "d.jsonl", b'{"completion": null}\n{"other": "x"}\n'),
            "no record of .*d.jsonl has a string 'completion'",
        ),
        (lambda p: _write(p / "d.parquet", b"PAR1 but not parquet"), r"d.parquet is not a readable Parquet file \("),
    ],
)
def test_damaged_or_misnamed_files_are_one_line_naming_the_file(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(JobError, match=message) as raised:
        load_corpus(str(source))
    assert "\n" not in str(raised.value)


def test_an_all_null_parquet_column_says_so(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"completion": [None, None]}).to_parquet(str(tmp_path / "n.parquet"))
    with pytest.raises(JobError, match=r"'completion' of n.parquet is not text \(every value is null\)"):
        load_corpus(str(tmp_path / "n.parquet"))


def _lines(count: int) -> bytes:
    import random

    rng = random.Random(0)  # text that does not compress to nothing, so that a cut lands inside the data
    texts = ("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(40)) for _ in range(count))
    return "".join(json.dumps({"completion": t}, ensure_ascii=False) + "\n" for t in texts).encode()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
