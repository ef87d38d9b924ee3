"""A weighted mix of sources (`job.core.data_spec`), prepared and read.

Each source is prepared on its own by `job.data.prepare.prepare` (its own cache entry, its own held-out split); the
training set interleaves their train splits with `datasets.interleave_datasets`, drawing a source per row by weight
with the run's seed. The result is an ordinary map-style dataset, the same on every rank and on every restart, so
the Trainer's shuffling, sharding and mid-epoch resume stay exact. Where its epoch ends is `--mix-until`: when the
first source has no rows left (`first_exhausted`, the default: no row repeats within it, and a later epoch reshuffles
the same rows), or once every source has been read whole (`all_exhausted`: the others start over meanwhile).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from job.core.config import RunConfig
from job.core.data_spec import DataSpec, Source
from job.core.errors import JobError

log = logging.getLogger("job")


def sources(cfg: RunConfig) -> list[Source] | None:
    """The mix this run reads (`--prepared` when given, else `--data`); None for one source."""
    spec = cfg.source_data
    return list(spec.sources) if spec is not None and spec.mixed else None


def source_config(cfg: RunConfig, source: Source) -> RunConfig:
    """`cfg` for one source of a mix: exactly the config of a run on that source alone."""
    field = "prepared" if cfg.prepared else "data"
    return dataclasses.replace(cfg, **{field: DataSpec.one(source.path)})


def load_source_corpus(cfg: RunConfig, source: Source):
    """One source's documents; a failure names the source."""
    from job.data.corpus import load_corpus

    try:
        return load_corpus(source.path, cfg.text_column, cfg.max_samples)
    except JobError as e:
        raise JobError(f"source {source.name}: {e.cause}", e.fix) from None


def load_source_corpora(cfg: RunConfig, mix: list[Source]) -> dict:
    """Every source's documents by name, or a refusal that leaves nothing behind: the Arrow conversions datasets
    made in this call of the sources read before the refused one (into the job's cache) are removed again."""
    from job.data.corpus import _datasets_cache as datasets_cache

    cache = Path(datasets_cache())
    before = _paths(cache)
    try:
        return {s.name: load_source_corpus(cfg, s) for s in mix}
    except JobError:
        made = _paths(cache) - before
        for path in sorted(p for p in made if p.parent not in made):  # the topmost of what this call made
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def _paths(folder: Path) -> set[Path]:
    """`folder` and everything in it (nothing if it is not there)."""
    return {folder, *folder.rglob("*")} if folder.is_dir() else set()


def prepare_mix(
    cfg: RunConfig, tokenizer, corpora: dict | None = None, output: str | None = None
) -> tuple[DataSpec, dict]:
    """Prepare each source of `cfg.data`'s mix as a run on it alone would (into OUTPUT/NAME, default the cache),
    reusing loaded `corpora`; every source is read before anything is written. Returns the `--prepared` mix of
    their folders (the same weights) and each source's `Prepared`."""
    from job.data.prepare import prepare

    mix = sources(cfg)
    corpora = {s.name: (corpora or {}).get(s.name) or load_source_corpus(cfg, s) for s in mix}
    done = {}
    for s in mix:
        folder = str(Path(output) / s.name) if output else None
        done[s.name] = result = prepare(source_config(cfg, s), tokenizer, folder, corpus=corpora[s.name])
        counts = {k: result.stats[k] for k in ("documents", "tokens", "rows")}
        log.info("data %s %s: %s (%s)", s.name, "cached" if result.cache_hit else "prepared", result.path, counts)
    return cfg.data.with_paths({name: str(result.path) for name, result in done.items()}), done


def prepared_splits(cfg: RunConfig) -> set[str]:
    """The splits `cfg.prepared` holds (a mix: those any of its sources holds)."""
    from job.data.prepare import read_prepared_stats

    folders = [s.path for s in cfg.prepared.sources]
    return {split for folder in folders for split in ("train", "eval") if split in read_prepared_stats(folder)}


def load_mix(prepared: DataSpec, seed: int, until: str) -> dict:
    """The training set of a `--prepared` mix and its held-out splits: {"train": Dataset, "eval": {name: Dataset}}
    ("eval" absent when no source holds one out)."""
    import datasets

    from job.data.prepare import load_prepared

    mix = prepared.sources
    parts = {s.name: load_prepared(s.path) for s in mix}
    empty = [s.name for s in mix if len(parts[s.name]["train"]) == 0]
    if empty:
        raise JobError(f"source {empty[0]} has no training rows", "give it more documents")
    train = datasets.interleave_datasets(
        [parts[s.name]["train"] for s in mix],
        probabilities=prepared.probabilities(),
        seed=seed,
        stopping_strategy=until,
    )
    evals = {name: part["eval"] for name, part in parts.items() if "eval" in part and len(part["eval"])}
    return {"train": train, **({"eval": evals} if evals else {})}
