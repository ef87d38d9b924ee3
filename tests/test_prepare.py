"""Document-boundary invariants: one eos per document, nothing dropped, truncation adds no eos, caching."""

from __future__ import annotations

import json

import pytest

from job.core.config import RunConfig
from job.data.prepare import prepare, token_ids_function
from tests.conftest import DOCS


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_packing_keeps_every_token_and_one_eos_per_document(tiny_tokenizer, docs_jsonl, tmp_path):
    cfg = RunConfig.load(data=str(docs_jsonl), max_length=16, packing=True, eval_fraction=0.0)
    result = prepare(cfg, tiny_tokenizer, str(tmp_path / "out"))
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats == result.stats
    eos = tiny_tokenizer.eos_token_id
    expected = [t for d in DOCS for t in [*_ids(tiny_tokenizer, d), eos]]
    rows = result.load()["train"]["input_ids"][:]
    assert [t for r in rows for t in r] == expected  # the stream, in order, nothing dropped
    assert all(len(r) == 16 for r in rows[:-1]) and 0 < len(rows[-1]) <= 16  # the last partial row is kept
    assert stats["documents"] == len(DOCS) == stats["eos_tokens"]
    assert stats["tokens"] == sum(len(_ids(tiny_tokenizer, d)) + 1 for d in DOCS) == len(expected)
    assert stats["rows"] == len(rows)
    assert stats["padding_tokens"] == 16 * len(rows) - len(expected)
    assert stats["truncated_documents"] == 0


def test_truncation_layout_adds_no_eos_to_cut_documents(tiny_tokenizer, docs_jsonl, tmp_path):
    length = 12
    cfg = RunConfig.load(data=str(docs_jsonl), max_length=length, packing=False, eval_fraction=0.0)
    result = prepare(cfg, tiny_tokenizer, str(tmp_path / "out"))
    rows = result.load()["train"]["input_ids"][:]
    eos = tiny_tokenizer.eos_token_id
    assert len(rows) == len(DOCS)
    cut = 0
    for doc, row in zip(DOCS, rows, strict=True):
        ids = _ids(tiny_tokenizer, doc)
        if len(ids) + 1 <= length:
            assert row == [*ids, eos]
        else:
            cut += 1
            assert row == ids[:length] and eos not in row
    assert cut == result.stats["truncated_documents"] > 0
    assert result.stats["eos_tokens"] == len(DOCS) - cut
    assert result.stats["tokens"] == sum(len(r) for r in rows)


def _packed(stream: list[int], length: int) -> list[list[int]]:
    return [stream[i : i + length] for i in range(0, len(stream), length)]


def test_packing_streams_batch_by_batch_and_restarts_per_block(tiny_tokenizer, tmp_path, monkeypatch):
    """The layout carries the partial row from one map batch to the next (memory is one batch) and restarts every
    BLOCK_DOCUMENTS documents, keeping each block's partial row."""
    import job.data.prepare as module
    from tests.conftest import write_jsonl

    docs = DOCS * 4  # 20 documents
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    eos = tiny_tokenizer.eos_token_id
    streams = [[t for d in docs[i : i + 8] for t in [*_ids(tiny_tokenizer, d), eos]] for i in range(0, 20, 8)]
    monkeypatch.setattr(module, "TOKENIZE_BATCH", 3)  # batches that cut blocks and rows anywhere
    monkeypatch.setattr(module, "BLOCK_DOCUMENTS", 8)
    cfg = RunConfig.load(data=str(path), max_length=16, eval_fraction=0.0, num_proc=1)
    result = prepare(cfg, tiny_tokenizer, str(tmp_path / "out"))
    rows = result.load()["train"]["input_ids"][:]
    assert rows == [r for s in streams for r in _packed(s, 16)]
    assert result.stats["rows"] == len(rows) and result.stats["eos_tokens"] == 20 == result.stats["documents"]
    assert result.stats["padding_tokens"] == 16 * len(rows) - sum(map(len, streams))


def test_processes_change_nothing_but_the_time(tiny_tokenizer, tmp_path, monkeypatch):
    """--num-proc 2 (two tokenizer threads) writes the rows and stats of one, in both layouts."""
    import job.data.prepare as module

    monkeypatch.setattr(module, "TOKENIZE_BATCH", 40)  # 300 documents: several batches per process
    for packing in (True, False):
        results = [
            prepare(
                RunConfig.load(max_samples=300, max_length=48, packing=packing, num_proc=n),
                tiny_tokenizer,
                str(tmp_path / f"{packing}-{n}"),
            )
            for n in (1, 2)
        ]
        one, two = (r.load() for r in results)
        assert results[0].stats == results[1].stats
        for split in ("train", "eval"):
            assert one[split]["input_ids"][:] == two[split]["input_ids"][:]


def test_each_tokenizer_thread_runs_one_rust_thread_and_the_setting_comes_back(tiny_tokenizer, tmp_path, monkeypatch):
    """N threads that each started a rayon pool of N would oversubscribe the cores: during prepare every tokenizer
    call runs one Rust thread; the caller's TOKENIZERS_PARALLELISM is back afterwards."""
    import os

    import job.data.prepare as module

    seen = []
    encoder = module._encoder

    def spying(*args):
        encode = encoder(*args)
        return lambda texts: seen.append(os.environ["TOKENIZERS_PARALLELISM"]) or encode(texts)

    monkeypatch.setattr(module, "_encoder", spying)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    prepare(RunConfig.load(max_samples=50, max_length=16, num_proc=2), tiny_tokenizer, str(tmp_path / "p"))
    assert seen and set(seen) == {"false"} and os.environ["TOKENIZERS_PARALLELISM"] == "true"


def test_processes_default_to_the_usable_cpus(monkeypatch):
    import job.data.prepare as module

    monkeypatch.setattr(module, "usable_cpus", lambda: 6)
    assert module.tokenizer_threads(RunConfig.load()) == 6 == module.tokenizer_threads(RunConfig.load(), 10**6)
    assert module.tokenizer_threads(RunConfig.load(num_proc=3)) == 3  # --num-proc overrides
    assert module.tokenizer_threads(RunConfig.load(), 2 * module.TOKENIZE_BATCH) == 2  # no thread without a batch


def test_eval_split_holds_out_whole_documents(tiny_tokenizer):
    cfg = RunConfig.load(max_samples=200, max_length=64, eval_fraction=0.1)
    stats = prepare(cfg, tiny_tokenizer).stats
    assert stats["eval"]["documents"] == 20 and stats["train"]["documents"] == 180
    assert stats["documents"] == 200 == stats["eos_tokens"]
    assert stats["tokens"] == stats["document_tokens"] + stats["documents"]


def test_second_identical_run_tokenizes_nothing(tiny_tokenizer, docs_jsonl, monkeypatch):
    import job.data.prepare as module

    cfg = RunConfig.load(data=str(docs_jsonl), max_length=32)
    first = prepare(cfg, tiny_tokenizer)
    assert not first.cache_hit

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(module, "_tokenize_and_layout", refuse)
    second = prepare(cfg, tiny_tokenizer)
    assert second.cache_hit and second.path == first.path and second.stats == first.stats
    with pytest.raises(AssertionError, match="tokenized again"):  # another length is another key
        prepare(RunConfig.load(data=str(docs_jsonl), max_length=33), tiny_tokenizer)


def test_output_with_other_settings_is_refused(tiny_tokenizer, docs_jsonl, tmp_path):
    from job.core.errors import JobError

    prepare(RunConfig.load(data=str(docs_jsonl), max_length=32), tiny_tokenizer, str(tmp_path / "out"))
    with pytest.raises(JobError, match="prepared with other settings"):
        prepare(RunConfig.load(data=str(docs_jsonl), max_length=64), tiny_tokenizer, str(tmp_path / "out"))


def test_a_folder_of_another_layout_is_refused_in_one_line(tiny_tokenizer, docs_jsonl, tmp_path):
    from job.core.errors import JobError
    from job.data.prepare import LAYOUT_VERSION, load_prepared

    out = tmp_path / "out"
    prepare(RunConfig.load(data=str(docs_jsonl), max_length=32), tiny_tokenizer, str(out))
    key = json.loads((out / "prepare_key.json").read_text())
    (out / "prepare_key.json").write_text(json.dumps({**key, "layout_version": LAYOUT_VERSION - 1}))
    with pytest.raises(JobError, match=rf"prepared in layout {LAYOUT_VERSION - 1}; this version reads layout"):
        load_prepared(str(out))


def test_fast_token_ids_equal_the_tokenizers_own_and_leave_it_unchanged(tiny_tokenizer):
    """prepare calls a private copy of the Rust tokenizer: the same ids, and "</s>" in the caller's tokenizer
    still means eos afterwards."""
    texts = [*DOCS, "", "</s></s>", "a</s>b"]
    got = token_ids_function(tiny_tokenizer)(texts)
    assert got == [_ids(tiny_tokenizer, t) for t in texts]
    assert tiny_tokenizer.eos_token_id not in [i for ids in got for i in ids]
    assert tiny_tokenizer("</s>", add_special_tokens=False)["input_ids"] == [tiny_tokenizer.eos_token_id]


def _prepare_process(*args: str, env: dict | None = None, preexec_fn=None):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "job", "prepare", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=preexec_fn,
    )


def test_prepare_writes_nothing_into_the_home_cache_nor_the_data_folder(tiny_tokenizer_dir, tmp_path):
    """A JSON Lines corpus (datasets builds Arrow files from it) and a save_to_disk one with an empty text (a
    datasets filter would write a cache file next to it): everything prepare writes is under JOB_CACHE and
    --output; nothing under HOME (~/.cache/huggingface) or the data folder."""
    import datasets

    from tests.conftest import write_jsonl

    data, home = tmp_path / "data", tmp_path / "home"
    data.mkdir()
    home.mkdir()
    write_jsonl(data / "docs.jsonl", [*DOCS, ""])
    datasets.Dataset.from_dict({"completion": [*DOCS, " "]}).save_to_disk(str(data / "disk"))
    before = _listing(data)
    env = {"HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"), "JOB_CACHE": str(tmp_path / "job")}
    for source in ("docs.jsonl", "disk"):
        args = ["--tokenizer", str(tiny_tokenizer_dir), "--data", str(data / source), "--max-length", "32"]
        proc = _prepare_process(*args, "--output", str(tmp_path / f"out-{source}"), env=env)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert json.loads(out)["documents"] == len(DOCS)  # the empty text dropped
    assert _listing(data) == before
    assert _listing(home) == []
    assert list((tmp_path / "job" / "datasets").rglob("*.arrow"))  # the JSON's Arrow files: in the job's cache


def _file_size_limit(limit: int):
    """For a child process: writing past `limit` bytes fails with EFBIG (a full disk, as a test can make one)."""

    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("where", ["output", "corpus"])
def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tiny_tokenizer_dir, tmp_path, where):
    """No room for the rows (output) or for the Arrow files datasets builds from a JSON corpus (corpus): one line,
    exit 2, no staging folder left, and the same command with room succeeds."""
    from job.data.corpus import builtin_articles
    from tests.conftest import write_jsonl

    args = ["--tokenizer", str(tiny_tokenizer_dir), "--max-length", "64", "--output", str(tmp_path / "p")]
    if where == "corpus":
        args += ["--data", str(write_jsonl(tmp_path / "big.jsonl", builtin_articles()[:300]))]
    env = {"JOB_CACHE": str(tmp_path / "job"), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = _prepare_process(*args, env=env, preexec_fn=_file_size_limit(64 * 1024))
    _, err = proc.communicate(timeout=600)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2, err.decode()[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: no room to write"), lines
    assert lines[0].endswith("-- free space or point JOB_CACHE/--output elsewhere")
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.staging-*"))
    proc = _prepare_process(*args, env=env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]


def test_two_prepares_of_one_key_at_once_one_writes_the_other_reuses(tiny_tokenizer_dir, tmp_path):
    args = ["--tokenizer", str(tiny_tokenizer_dir), "--max-samples", "1500", "--output", str(tmp_path / "p")]
    procs = [_prepare_process(*args) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode()[-2000:] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    assert sorted(r["cache_hit"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"] and results[0]["rows"] == results[1]["rows"]
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_a_killed_prepare_leaves_staging_that_the_next_one_removes(tiny_tokenizer_dir, tmp_path):
    import signal
    import time

    from job.data.tokenizer import load_tokenizer

    target = tmp_path / "p"
    (tmp_path / ".p.mine").mkdir()  # not our staging pattern: never touched
    proc = _prepare_process("--tokenizer", str(tiny_tokenizer_dir), "--output", str(target))
    deadline = time.time() + 300
    while not list(tmp_path.glob(".p.staging-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    assert list(tmp_path.glob(".p.staging-*")) and not target.exists()

    cfg = RunConfig.load(max_length=RunConfig().max_length)
    result = prepare(cfg, load_tokenizer(str(tiny_tokenizer_dir)), str(target))
    assert not result.cache_hit and (target / "prepare_key.json").exists()
    assert not list(tmp_path.glob(".p.staging-*"))
    assert (tmp_path / ".p.mine").is_dir()


def test_a_foreign_output_is_refused_before_anything_is_written(tiny_tokenizer, docs_jsonl, tmp_path):
    from job.core.errors import JobError

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    cfg = RunConfig.load(data=str(docs_jsonl), max_length=32)
    with pytest.raises(JobError, match="is not a prepared dataset"):
        prepare(cfg, tiny_tokenizer, str(theirs))
    with pytest.raises(JobError, match="is a file"):
        prepare(cfg, tiny_tokenizer, str(tmp_path / "file"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before and [p.name for p in theirs.iterdir()] == ["notes.txt"]


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_shards_are_one_dataset_identical_to_one_process(tiny_tokenizer, tmp_path, monkeypatch):
    """Three shards prepared in any order, the last writing the index, load as the rows, order and stats of one
    process; and a one-process prepare of that folder is a cache hit."""
    import job.data.prepare as module
    from job.core.errors import JobError
    from job.data.prepare import Shard, load_prepared, read_prepared_stats

    monkeypatch.setattr(module, "BLOCK_DOCUMENTS", 40)  # 270 train documents: 7 blocks; 30 held out: 1
    cfg = RunConfig.load(max_samples=300, max_length=48, eval_fraction=0.1, num_proc=1)
    one = prepare(cfg, tiny_tokenizer, str(tmp_path / "one"))
    for index in (2, 0):
        part = prepare(cfg, tiny_tokenizer, str(tmp_path / "set"), shard=Shard(index, 3))
        assert part.path == tmp_path / "set" / Shard(index, 3).folder and not part.cache_hit
    with pytest.raises(JobError, match=r"lacks 1 of its 3 shards \(1/3\)"):
        read_prepared_stats(str(tmp_path / "set"))
    with pytest.raises(JobError, match=r"lacks 1 of its 3 shards \(1/3\)"):  # one process does not fill the gap
        prepare(cfg, tiny_tokenizer, str(tmp_path / "set"))
    whole = prepare(cfg, tiny_tokenizer, str(tmp_path / "set"), shard=Shard(1, 3))
    assert whole.path == tmp_path / "set" and whole.stats == one.stats
    assert json.loads((tmp_path / "set" / "stats.json").read_text()) == one.stats
    mine, theirs = load_prepared(str(tmp_path / "set")), one.load()
    for split in ("train", "eval"):
        assert mine[split]["input_ids"][:] == theirs[split]["input_ids"][:]
    assert one.stats["train"]["rows"] > 7 and one.stats["eval"]["documents"] == 30
    again = prepare(cfg, tiny_tokenizer, str(tmp_path / "set"))  # the set is one prepared dataset
    assert again.cache_hit and again.stats == one.stats
    assert prepare(cfg, tiny_tokenizer, str(tmp_path / "set"), shard=Shard(0, 3)).cache_hit


def test_a_missing_extra_or_foreign_shard_is_refused_and_nothing_written(tiny_tokenizer, tmp_path, monkeypatch):
    import shutil

    import job.data.prepare as module
    from job.core.errors import JobError
    from job.data.prepare import Shard, load_prepared

    monkeypatch.setattr(module, "BLOCK_DOCUMENTS", 40)
    cfg = RunConfig.load(max_samples=120, max_length=48, eval_fraction=0.0, num_proc=1)
    out = tmp_path / "set"
    prepare(cfg, tiny_tokenizer, str(out), shard=Shard(0, 2))
    before = _listing(out)
    cases = [
        (RunConfig.load(max_samples=120, max_length=64, eval_fraction=0.0), Shard(1, 2), "another max_length"),
        (RunConfig.load(max_samples=119, max_length=48, eval_fraction=0.0), Shard(1, 2), "another corpus"),
        (cfg, Shard(1, 3), r"holds shard 0/2, which is not one of 3 shards"),
    ]
    for other, shard, message in cases:
        with pytest.raises(JobError, match=message):
            prepare(other, tiny_tokenizer, str(out), shard=shard)
        assert _listing(out) == before
    (out / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match=r"holds notes\.txt, which is not a shard"):
        prepare(cfg, tiny_tokenizer, str(out), shard=Shard(1, 2))
    (out / "notes.txt").unlink()

    prepare(cfg, tiny_tokenizer, str(out), shard=Shard(1, 2))  # completes the set
    assert len(load_prepared(str(out))["train"]) > 0
    shutil.rmtree(out / Shard(1, 2).folder)  # a shard lost after the index was written
    with pytest.raises(JobError, match=r"lacks 1 of its 2 shards \(1/2\)"):
        load_prepared(str(out))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("3/3", "--shard 3/3 is out of range"),
        ("1", "is not I/N"),
        ("-1/2", "is not I/N"),
        ("0/0", "is not I/N"),
        ("0/100000", "100000 shards are more than 99,999"),  # a shard folder's name holds five digits
    ],
)
def test_a_bad_shard_is_one_line_exit_2_before_anything_is_read(tiny_tokenizer_dir, tmp_path, value, message):
    from click.testing import CliRunner

    from job.cli import cli

    args = ["prepare", "--tokenizer", str(tiny_tokenizer_dir), "--shard", value, "--output", str(tmp_path / "p")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_a_signal_while_several_threads_tokenize_stops_at_once_in_one_line(tmp_path, tiny_tokenizer_dir, delay):
    """SIGTERM at some moment while two threads tokenize: exit 75 within seconds, one line, nothing at --output
    and no staging folder left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from job.data.corpus import builtin_articles
    from tests.conftest import REPO, write_jsonl

    data = write_jsonl(tmp_path / "big.jsonl", builtin_articles()[:400] * 40)
    output = tmp_path / "prepared"
    argv = ["prepare", "--tokenizer", str(tiny_tokenizer_dir), "--data", str(data), "--output", str(output)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", *argv, "--num-proc", "2"], stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.time() + 300
    while not list(tmp_path.glob(".prepared.staging-*/train.arrow")):  # the layout has begun: tokenizing
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timed out"
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert time.time() - signalled < 10, "the stop took too long"
    assert err.strip().splitlines() == ["stopped by SIGTERM -- run the same command again"], err
    assert not output.exists() and not list(tmp_path.glob(".prepared.staging-*"))


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_a_damaged_cache_entry_is_prepared_again(tiny_tokenizer, docs_jsonl, damage, caplog):
    from job.data.prepare import load_prepared

    cfg = RunConfig.load(data=str(docs_jsonl), max_length=16, eval_fraction=0.0)
    first = prepare(cfg, tiny_tokenizer)
    rows = load_prepared(str(first.path))["train"].to_dict()["input_ids"]
    damage(first.path / "train.arrow")
    again = prepare(cfg, tiny_tokenizer)
    assert again.path == first.path and not again.cache_hit
    assert load_prepared(str(again.path))["train"].to_dict()["input_ids"] == rows
    assert "is damaged" in caplog.text and "train.arrow" in caplog.text


@pytest.mark.parametrize(
    "damage, words", [(_truncate, r"is \d+ bytes, \d+ were written"), (_flip, "changed since it was written")]
)
def test_a_damaged_prepared_folder_of_the_users_is_refused_in_one_line(
    tiny_tokenizer, docs_jsonl, tmp_path, damage, words
):
    from job.core.errors import JobError
    from job.data.prepare import check_contents, load_prepared

    cfg = RunConfig.load(data=str(docs_jsonl), max_length=16, eval_fraction=0.0)
    out = tmp_path / "out"
    prepare(cfg, tiny_tokenizer, str(out))
    damage(out / "train.arrow")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(JobError, match=f"prepared data {out} is damaged: .*train.arrow.*{words}"):
        prepare(cfg, tiny_tokenizer, str(out))  # not the cache's: refused, never deleted
    with pytest.raises(JobError, match=words):
        check_contents(out)  # what train checks of a --prepared folder before it launches
    assert sorted(p.name for p in out.iterdir()) == before
    if damage is _truncate:  # what a worker checks before pyarrow reads it
        with pytest.raises(JobError, match="were written"):
            load_prepared(str(out))


def test_a_cache_entry_that_is_a_link_out_of_the_cache_is_refused(tiny_tokenizer, docs_jsonl, tmp_path):
    from job.core.errors import JobError

    cfg = RunConfig.load(data=str(docs_jsonl), max_length=16, eval_fraction=0.0)
    entry = prepare(cfg, tiny_tokenizer).path
    outside = tmp_path / "elsewhere"
    entry.rename(outside)
    entry.symlink_to(outside, target_is_directory=True)
    before = sorted((p.name, p.stat().st_size) for p in outside.iterdir())
    with pytest.raises(JobError, match=f"{entry} is a symbolic link"):
        prepare(cfg, tiny_tokenizer)
    assert sorted((p.name, p.stat().st_size) for p in outside.iterdir()) == before


@pytest.mark.parametrize("folder", ["prepared", "datasets"])
def test_a_cache_folder_that_is_a_link_out_of_the_cache_is_refused(
    tiny_tokenizer, docs_jsonl, tmp_path, job_cache, folder
):
    """The folders the job makes in JOB_CACHE: what lies below a link there would be written outside it."""
    from job.core.errors import JobError

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (job_cache / folder).symlink_to(outside, target_is_directory=True)
    cfg = RunConfig.load(data=str(docs_jsonl), max_length=16, eval_fraction=0.0)
    with pytest.raises(JobError, match=f"{job_cache / folder} is a symbolic link .*remove the link"):
        prepare(cfg, tiny_tokenizer)
    assert list(outside.iterdir()) == []


def test_the_largest_shard_count_names_a_folder_its_own_pattern_reads():
    from job.data.prepare import _SHARD_FOLDER, MAX_SHARDS, Shard

    last = Shard.parse(f"{MAX_SHARDS - 1}/{MAX_SHARDS}")
    assert _SHARD_FOLDER.fullmatch(last.folder)[2] == str(MAX_SHARDS)
