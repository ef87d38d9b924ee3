"""Model folders read without loading them: a safetensors file checked against its own header, and a fingerprint
of a model folder (config and weight headers) that changes when the model does. Stdlib only."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from job.core.errors import JobError


def check_weights(folder: Path) -> None:
    """Every safetensors file in `folder` has a readable header whose tensors end exactly at the file's end
    (a truncated download or copy fails here, in one line, instead of deep inside `from_pretrained`)."""
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        problem = None
        with path.open("rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if length is None or length > size - 8 or length > 100 * 2**20:
                problem = "no valid header"
            else:
                try:
                    header = json.loads(f.read(length))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError):
                    problem = "a corrupt header"
                else:
                    if 8 + length + end != size:
                        problem = f"{size} bytes where its header describes {8 + length + end}"
        if problem:
            raise JobError(
                f"weights {path} are truncated or corrupt ({problem})",
                "copy or download the model folder again",
            )


def model_fingerprint(folder: Path) -> str:
    """Changes with the model's config or weights (their headers and sizes: cheap, no tensor read)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin"):
            digest.update(path.name.encode() + str(path.stat().st_size).encode())
            with path.open("rb") as f:
                digest.update(f.read(1 << 16) if path.suffix != ".json" else f.read())
    return digest.hexdigest()[:16]
