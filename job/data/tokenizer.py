"""Loading a tokenizer (a folder, the model's own) and training a Bloom-style byte-level BPE.

No registry package ships Bloom's tokenizer, so the out-of-the-box run trains one on the built-in corpus:
Bloom's pre-tokenizer, no prefix space, specials `<unk> <s> </s> <pad>` at ids 0-3 as in Bloom.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from job.core.config import cache_root
from job.core.errors import JobError
from job.core.files import FileLock, apply_umask, new_folder, refuse_link

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0-3, as in Bloom
# Bloom's split: runs of non-space, non-punctuation characters keep one leading space.
_BLOOM_SPLIT = r" ?[^(\s|[.,!?…。，、।۔،])]+"


def train_tokenizer(texts: Iterable[str], vocab_size: int, output: Path):
    """Train a byte-level BPE on `texts` and save it as an HF tokenizer folder at `output`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIALS) + 256:
        raise JobError(f"--vocab-size {vocab_size} is too small", "a byte-level BPE needs at least 260 entries")
    check_new_folder(output)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_BLOOM_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )
    _save_atomically(tokenizer, output)
    return tokenizer


def builtin_tokenizer(vocab_size: int):
    """The BPE trained on the built-in corpus, built once and cached under $JOB_CACHE/tokenizers."""
    from job.data.corpus import _BUILTIN_VERSION, BUILTIN_NAME, builtin_articles

    key = hashlib.sha256(f"{BUILTIN_NAME}:v{_BUILTIN_VERSION}:{vocab_size}:{_BLOOM_SPLIT}".encode()).hexdigest()[:12]
    folder = cache_root() / "tokenizers" / f"builtin-{vocab_size}-{key}"
    refuse_link(folder, cache_root())
    if not (folder / "tokenizer.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(folder.parent / f".{folder.name}.lock"):  # several first runs: one trains, the others reuse
            if not (folder / "tokenizer.json").exists():
                train_tokenizer(builtin_articles(), vocab_size, folder)
    return load_tokenizer(str(folder))


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise JobError(f"tokenizer folder {path} does not exist", "pass an HF tokenizer folder with --tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise JobError(
            f"{path} holds no loadable tokenizer ({type(e).__name__})",
            "pass a folder with tokenizer.json / tokenizer_config.json",
        ) from None
    check_specials(tokenizer, path)
    return tokenizer


def check_specials(tokenizer, where: str) -> None:
    """Training needs an eos to end each document and a pad distinct from it (or every eos label is masked)."""
    if tokenizer.eos_token_id is None:
        raise JobError(f"tokenizer {where} has no eos token", "set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        raise JobError(f"tokenizer {where} has no pad token", "set pad_token (e.g. <pad>) in its tokenizer_config.json")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise JobError(
            f"tokenizer {where} uses the same id {tokenizer.eos_token_id} for pad and eos, so every eos "
            "label would be masked",
            "give it a distinct pad token (e.g. <pad>)",
        )


def run_tokenizer(cfg):
    """The tokenizer a run's config names (`resolve_tokenizer` of its fields)."""
    return resolve_tokenizer(cfg.tokenizer, cfg.model, cfg.vocab_size, cfg.trust_remote_code)


def resolve_tokenizer(tokenizer: str | None, model: str | None, vocab_size: int, trust_remote_code: bool = False):
    """`--tokenizer`, else the model's own, else the built-in BPE."""
    if tokenizer:
        return load_tokenizer(tokenizer, trust_remote_code)
    if model:
        return load_tokenizer(model, trust_remote_code)
    return builtin_tokenizer(vocab_size)


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the ids a text maps to would."""
    state = {
        "backend": tokenizer.backend_tokenizer.to_str(),
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "added": sorted(tokenizer.get_added_vocab().items()),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def check_new_folder(output: Path) -> None:
    """The tokenizer is written to a new or empty folder: the job never replaces what it did not write."""
    if output.exists() and not output.is_dir():
        raise JobError(f"--output {output} is a file", "pass a folder for the tokenizer (new or empty)")
    if output.is_dir() and any(output.iterdir()):
        raise JobError(f"--output {output} is not empty", "pass a new or empty folder for the tokenizer")


def _save_atomically(tokenizer, output: Path) -> None:
    staging = new_folder(output.parent, f".{output.name}.")
    try:
        tokenizer.save_pretrained(str(staging))
        apply_umask(staging)
        if output.exists():
            output.rmdir()  # empty (check_new_folder)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
