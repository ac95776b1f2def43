"""What a model folder holds, read without loading it: its weights' bytes and stored dtype.

The dtype comes from the safetensors headers (a few KB per shard), else from config.json, so
`merge.dtype: auto` and `eval.dtype: auto` cost no weight reads.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tasks.core.store import weight_files

DTYPES = ("float32", "float16", "bfloat16")  # what a merge or an evaluation can run in
AUTO = "auto"
# safetensors dtype names of the floating types we write; others (F64, F8_*) read as float32
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def model_bytes(model_dir: Path) -> int:
    """Bytes of the weight files in `model_dir` (what one loaded copy roughly occupies)."""
    return sum(p.stat().st_size for p in weight_files(Path(model_dir)))


def _header(path: Path) -> dict:
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(size))


def stored_dtype(model_dir: Path) -> str:
    """The floating dtype most of `model_dir`'s parameters are stored in: counted over the
    safetensors headers (a model may keep a few tensors, e.g. norms, in float32), else
    config.json's `dtype` / `torch_dtype` (pickled checkpoints), else float32."""
    model_dir = Path(model_dir)
    counts: Counter[str] = Counter()
    for path in weight_files(model_dir):
        if path.suffix != ".safetensors":
            continue
        for name, info in _header(path).items():
            if name == "__metadata__" or info["dtype"] in ("I8", "U8", "I16", "I32", "I64", "BOOL"):
                continue
            elements = 1
            for dim in info["shape"]:
                elements *= dim
            counts[SAFETENSORS_DTYPES.get(info["dtype"], "float32")] += elements
    if counts:
        return counts.most_common(1)[0][0]
    config = model_dir / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        named = data.get("dtype") or data.get("torch_dtype")
        if named in DTYPES:
            return named
    return "float32"


def effective_dtype(setting: str, models: Sequence[Path]) -> str:
    """`setting` itself, or for `auto` the dtype the `models` are stored in. Models stored in
    different dtypes give float32: it holds float16 and bfloat16 values exactly, while neither
    of those holds the other's (bfloat16 lacks float16's precision, float16 bfloat16's range)."""
    if setting != AUTO:
        return setting
    found = sorted({stored_dtype(Path(m)) for m in models})
    if len(found) == 1:
        return found[0]
    logging.getLogger(__name__).warning(
        "models stored in %s: merging in float32 (set merge.dtype to choose)", " and ".join(found)
    )
    return "float32"
