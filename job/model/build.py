"""Loading or initialising the Bloom model: a local HF folder laid out like Langboat/bloom-389m-zh (never a hub
download at run time) or a random init of a preset shape. The model comes back stock; the fast paths are applied
where the trainer is built (`job.model.patches`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from job.core.errors import JobError

# The Langboat Bloom-zh family as their config.json files have it (vocabulary-pruned from bigscience's bloom-560m,
# -1b1, -1b7, -3b, -7b1; tied embeddings). `tiny` takes the tokenizer's vocabulary (rounded up to VOCAB_MULTIPLE).
BLOOM_ZH_SPECIAL = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
    "unk_token_id": 0,
    "offset_alibi": 100,
    "seq_length": 2048,
}
PRESET_SHAPES: dict[str, dict] = {
    "tiny": {"hidden_size": 128, "n_layer": 4, "n_head": 4},
    "bloom-389m-zh": {"hidden_size": 1024, "n_layer": 24, "n_head": 16, "vocab_size": 42437, **BLOOM_ZH_SPECIAL},
    "bloom-800m-zh": {"hidden_size": 1536, "n_layer": 24, "n_head": 16, "vocab_size": 46145, **BLOOM_ZH_SPECIAL},
    "bloom-1b4-zh": {"hidden_size": 2048, "n_layer": 24, "n_head": 16, "vocab_size": 46145, **BLOOM_ZH_SPECIAL},
    "bloom-2b5-zh": {"hidden_size": 2560, "n_layer": 30, "n_head": 32, "vocab_size": 46145, **BLOOM_ZH_SPECIAL},
    "bloom-6b4-zh": {"hidden_size": 4096, "n_layer": 30, "n_head": 32, "vocab_size": 46145, **BLOOM_ZH_SPECIAL},
}
VOCAB_MULTIPLE = 64  # random-init vocabularies are rounded up to this (tensor-core friendly shapes)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ------------------------------------------------------------------------------------------------- config
def model_config(cfg, vocab: int | None):
    """The model's config: read and checked from `cfg.model`, else the preset's for a tokenizer of `vocab`."""
    from transformers import BloomConfig

    if not cfg.model:
        return preset_config(cfg.preset, vocab)
    folder = Path(cfg.model)
    if not folder.is_dir():
        raise JobError(
            f"model folder {folder} does not exist",
            "pass a local HF folder laid out like Langboat/bloom-389m-zh (config.json + weights) to --model",
        )
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"{path} is missing", "point --model at an HF model folder that has config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JobError(f"{path} is not valid JSON ({e})", "fix the file or download the model again") from None
    if not isinstance(data, dict):
        raise JobError(f"{path} holds a {type(data).__name__}, not a config object", "download the model again")
    remote = bool(getattr(cfg, "trust_remote_code", False)) and "AutoModelForCausalLM" in (data.get("auto_map") or {})
    if data.get("model_type") != "bloom" and not remote:
        raise JobError(
            f"{path} is not a Bloom causal LM config (model_type={data.get('model_type')!r})",
            "use a Bloom model such as Langboat/bloom-389m-zh (or --trust-remote-code for a Bloom-like "
            "model whose config maps AutoModelForCausalLM)",
        )
    try:
        if remote:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
        else:
            config = BloomConfig.from_dict(data)
    except Exception as e:
        raise JobError(
            f"{path} is not a usable Bloom config ({type(e).__name__}: {e})".replace("\n", " "),
            "fix config.json or download the model again",
        ) from None
    if vocab is not None and vocab > config.vocab_size:
        raise JobError(
            f"len(tokenizer)={vocab} > model vocab {config.vocab_size}: some token ids have no embedding",
            "use the model's own tokenizer (or one no larger than its vocabulary)",
        )
    return config


def preset_config(preset: str, vocab: int | None = None):
    """A preset's BloomConfig: the family's own vocabulary (a tokenizer of `vocab` tokens must fit it), or for
    `tiny` the tokenizer's rounded up."""
    from transformers import BloomConfig

    shape = dict(PRESET_SHAPES[preset])
    if "vocab_size" not in shape:
        shape["vocab_size"] = -(-(vocab or 8000) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif vocab is not None and vocab > shape["vocab_size"]:
        raise JobError(
            f"len(tokenizer)={vocab} > preset {preset}'s vocabulary {shape['vocab_size']}",
            "use a tokenizer no larger than the model's (e.g. its own), or --preset tiny",
        )
    return BloomConfig(**shape)


# --------------------------------------------------------------------------------------------------- build
def build_model(cfg, tokenizer):
    """The stock HF model for `cfg`: loaded from `cfg.model` or random-initialised from `cfg.preset`.

    Seed-determinism of the random init is the caller's (`transformers.set_seed`) before this call.
    """
    from transformers import AutoModelForCausalLM, BloomForCausalLM

    config = model_config(cfg, len(tokenizer))
    if cfg.model:
        folder = Path(cfg.model)
        if not any((folder / name).exists() for name in WEIGHT_FILES):
            raise JobError(
                f"{folder} has no weights ({' / '.join(WEIGHT_FILES[::2])})",
                "point --model at a complete HF model folder",
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), trust_remote_code=cfg.trust_remote_code, dtype=torch.float32
            )  # fp32 master weights
        except (OSError, ValueError, RuntimeError) as e:
            raise JobError(
                f"cannot load the model in {folder} ({type(e).__name__}: {e})".replace("\n", " "),
                "check the folder's weights match its config.json",
            ) from None
        rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise JobError(
                f"len(tokenizer)={len(tokenizer)} > model vocab {rows}",
                "use the model's own tokenizer (or one no larger than its vocabulary)",
            )
    else:
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.unk_token_id = tokenizer.unk_token_id
        model = BloomForCausalLM(config)
    return model


# --------------------------------------------------------------------------------------------------- sizes
def parameter_count(model) -> int:
    """Parameters, tied embeddings once (also under ZeRO-3, where a partitioned tensor reports `ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
