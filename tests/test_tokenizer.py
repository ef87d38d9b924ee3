"""The built-in BPE: Bloom's specials at 0-3, lossless, cached; bad tokenizers are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from job.core.errors import JobError
from job.data.tokenizer import check_specials, load_tokenizer, tokenizer_fingerprint
from tests.conftest import DOCS


def test_specials_and_round_trip(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>"]) == [0, 1, 2, 3]
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 3)
    for text in DOCS:
        ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.eos_token_id not in ids  # a literal "</s>" stays text


def test_builtin_tokenizer_is_cached(job_cache):
    from job.data.tokenizer import builtin_tokenizer

    first = builtin_tokenizer(1000)
    folder = first.name_or_path
    mtime = (job_cache / "tokenizers").stat().st_mtime_ns
    second = builtin_tokenizer(1000)
    assert second.name_or_path == folder
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    assert (job_cache / "tokenizers").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("linked", ["tokenizers", "entry"])
def test_a_tokenizer_cache_reached_through_a_link_is_refused(job_cache, tmp_path, linked):
    from job.data.tokenizer import builtin_tokenizer

    shared = builtin_tokenizer(1000).name_or_path  # an entry as the cache holds it
    outside = tmp_path / "elsewhere"
    moved = Path(shared) if linked == "entry" else job_cache / "tokenizers"
    moved.rename(outside)
    moved.symlink_to(outside, target_is_directory=True)
    before = sorted(p.relative_to(outside) for p in outside.rglob("*"))
    with pytest.raises(JobError, match=f"{moved} is a symbolic link .*the job writes only inside {job_cache}"):
        builtin_tokenizer(1000)
    if linked == "tokenizers":
        with pytest.raises(JobError, match=f"{moved} is a symbolic link"):
            builtin_tokenizer(1200)  # one it would train and write
    assert sorted(p.relative_to(outside) for p in outside.rglob("*")) == before


def test_pad_equal_to_eos_is_refused(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    with pytest.raises(JobError, match="same id"):
        check_specials(tok, "t")


def test_tokenizer_without_eos_is_refused(tiny_tokenizer_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "noeos"
    shutil.copytree(tiny_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(JobError, match="no eos token"):
        load_tokenizer(str(folder))


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(JobError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))


def test_output_must_be_new_or_empty(tmp_path):
    from job.data.tokenizer import train_tokenizer

    (tmp_path / "file").write_text("x")
    with pytest.raises(JobError, match="is a file"):
        train_tokenizer(DOCS, 300, tmp_path / "file")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "keep.txt").write_text("x")
    with pytest.raises(JobError, match="is not empty"):
        train_tokenizer(DOCS, 300, tmp_path / "theirs")
    assert (tmp_path / "theirs" / "keep.txt").read_text() == "x"
    (tmp_path / "empty").mkdir()
    train_tokenizer(DOCS, 300, tmp_path / "empty")
    assert (tmp_path / "empty" / "tokenizer.json").exists()
