"""Streaming tensor access for delta parameters (model − base) over safetensors checkpoints.

Nothing here loads a whole model. Each shard is memory-mapped and tensors are handed out as
zero-copy views of at most `chunk_elems` elements; once the consumer has moved on, the chunk's
pages are dropped from the process (MADV_DONTNEED), so resident memory stays bounded by a chunk
per model. With safetensors' own mmap (safe_open + get_slice) the touched pages stay mapped until
the file is closed: reading a 1 GB model tensor by tensor leaves ~1 GB resident (measured). The
page cache keeps the data, so dropping the pages costs no second read from disk.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

LOG = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype -> the numpy dtype its bytes are read as, for the floating-point tensors we
# compare (numpy has no bfloat16 or float8: their bit patterns are read as unsigned integers and
# decoded by `decode`); anything else (integer buffers, bool masks) is skipped.
FLOAT_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
}
VOCAB_MISMATCH = ("shared_rows", "error")
# A model with tied word embeddings computes its logits with the input embedding matrix. Some
# checkpoints still store that matrix a second time under the output name (older transformers,
# some hub fine-tunes); transformers ignores the copy when the config says the two are tied.
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")
INPUT_EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
)
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor table of one .safetensors file (8-byte length, JSON header, raw data)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if length > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {length})")
        header = json.loads(f.read(length))
    start = 8 + length
    table = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        info = TensorInfo(
            meta["dtype"], tuple(meta["shape"]), path.name, start + begin, end - begin
        )
        if info.is_float and info.nbytes != info.numel * FLOAT_DTYPES[info.dtype].itemsize:
            raise ValueError(f"{path}: tensor '{name}' has {info.nbytes} bytes for {info.shape}")
        if start + end > size:
            raise ValueError(f"{path}: tensor '{name}' runs past the end of the file")
        table[name] = info
    return table


class SafetensorsModel:
    """The tensors of one model folder: model.safetensors, or shards listed in
    model.safetensors.index.json (or, without an index, every *.safetensors file).

    When config.json ties the word embeddings, a stored copy of the input embedding under the
    output name (lm_head.weight) is not one of `tensors`: the model has one such matrix, and a
    delta counted twice would weigh it double in every kinship metric. `tied` names the copy.
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] | None = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif self.folder.is_dir():
            weight_map = None
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        else:
            raise FileNotFoundError(f"{self.folder}: no such model folder")
        if not files:
            raise FileNotFoundError(f"{self.folder}: no *.safetensors weights")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(self.folder / file).items():
                if (
                    weight_map is None or weight_map.get(name) == file
                ) and name not in self.tensors:
                    self.tensors[name] = info
        # output embedding -> the input embedding it is tied to; the copy is not the model's
        self.tied: dict[str, str] = _tied_copies(self.folder, self.tensors)
        for name in self.tied:
            del self.tensors[name]
        self._maps: dict[str, mmap.mmap] = {}

    def _map(self, file: str) -> mmap.mmap:
        if file not in self._maps:
            with open(self.folder / file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            mm.madvise(mmap.MADV_SEQUENTIAL)
            self._maps[file] = mm
        return self._maps[file]

    def _span(self, name: str, start: int, stop: int) -> tuple[TensorInfo, int, int]:
        info = self.tensors[name]
        size = FLOAT_DTYPES[info.dtype].itemsize
        return info, info.offset + start * size, info.offset + stop * size

    def view(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of the flattened (row-major) tensor, zero-copy, 1-D, read-only,
        as stored (FLOAT_DTYPES: bf16 and f8 as their bit patterns; `decode` makes floats)."""
        info, lo, hi = self._span(name, start, stop)
        dtype = FLOAT_DTYPES[info.dtype]
        mm = self._map(info.file)
        if lo % dtype.itemsize:  # a misaligned tensor (old writers did not pad the header)
            return np.frombuffer(mm[lo:hi], dtype=dtype)
        return np.frombuffer(mm, dtype=dtype, count=stop - start, offset=lo)

    def _advise(self, name: str, start: int, stop: int, advice: int) -> None:
        info, lo, hi = self._span(name, start, stop)
        lo -= lo % _PAGE
        if hi > lo:
            self._map(info.file).madvise(advice, lo, hi - lo)

    def release(self, name: str, start: int, stop: int) -> None:
        """Unmap the pages of a chunk from this process; a later view faults them back in."""
        self._advise(name, start, stop, mmap.MADV_DONTNEED)

    def prefetch(self, name: str, start: int, stop: int) -> None:
        """Start reading a chunk ahead of time (overlaps disk reads with compute)."""
        self._advise(name, start, stop, mmap.MADV_WILLNEED)


def ties_embeddings(folder: Path) -> bool:
    """Whether the model's config.json ties the output embedding to the input one (also for
    configs that nest the language model's settings under text_config). Without a config, or
    without the key, nothing is assumed tied."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text())
    except ValueError:
        return False
    tied = config.get("tie_word_embeddings")
    if tied is None and isinstance(config.get("text_config"), dict):
        tied = config["text_config"].get("tie_word_embeddings")
    return bool(tied)


def _tied_copies(folder: Path, tensors: dict[str, TensorInfo]) -> dict[str, str]:
    """{stored output embedding: input embedding} when the config ties them and both are stored."""
    if not ties_embeddings(folder):
        return {}
    inputs = [n for n in tensors if n.endswith(INPUT_EMBEDDINGS)]
    outputs = [n for n in tensors if n in OUTPUT_EMBEDDINGS]
    if len(inputs) != 1 or not outputs:
        return {}  # nothing stored twice, or no single matrix it could be a copy of
    return dict.fromkeys(outputs, inputs[0])


@dataclass
class Plan:
    """What a base and its models share: tensors to compare and what was left out."""

    tensors: list[tuple[str, int]] = field(default_factory=list)  # (name, leading elements used)
    skipped: list[str] = field(default_factory=list)  # not floating point (in some model)
    missing: dict[str, list[str]] = field(default_factory=dict)  # label -> names it lacks
    truncated: list[str] = field(default_factory=list)  # vocab rows cut to the shared ones
    tied: dict[str, str] = field(default_factory=dict)  # stored tied copy -> the matrix it copies

    @property
    def n_elems(self) -> int:
        return sum(n for _, n in self.tensors)

    def report(self) -> dict[str, Any]:
        """What was compared and what was not, with why: for results and logs."""
        skipped = {name: "not floating point" for name in self.skipped}
        for name, target in self.tied.items():
            skipped[name] = f"tied to {target}: the shared matrix is counted once"
        absent: dict[str, list[str]] = {}
        for label, names in self.missing.items():
            for name in names:
                absent.setdefault(name, []).append(label)
        for name, labels in absent.items():
            skipped[name] = "absent from " + ", ".join(labels)
        return {
            "n_tensors": len(self.tensors),
            "n_params": self.n_elems,
            "skipped": dict(sorted(skipped.items())),
            "truncated": list(self.truncated),
        }

    def summary(self) -> str:
        """One line for the log."""
        report = self.report()
        line = f"compared {report['n_tensors']} tensors ({report['n_params']:,} parameters)"
        if report["skipped"]:
            line += "; skipped " + "; ".join(f"{n} ({why})" for n, why in report["skipped"].items())
        if self.truncated:
            line += "; shared vocabulary rows only: " + ", ".join(self.truncated)
        return line


def plan(
    base: SafetensorsModel,
    models: Sequence[SafetensorsModel],
    labels: Sequence[str],
    vocab_mismatch: str = "shared_rows",
) -> Plan:
    """Match tensors by name across the base and all models, validate shapes.

    `labels` names the base then each model in the report of missing tensors. A tensor some model
    lacks is compared nowhere (every pair must see the same vector). Shapes may differ only in dim 0
    (vocabulary rows of embed_tokens / lm_head): compare the shared leading rows, with a warning, or
    raise, by `vocab_mismatch`.
    """
    if vocab_mismatch not in VOCAB_MISMATCH:
        raise ValueError(f"vocab_mismatch '{vocab_mismatch}': use one of {VOCAB_MISMATCH}")
    out = Plan()
    readers = [base, *models]
    for reader in readers:  # readers hide a tied copy: the shared matrix is compared once
        out.tied.update(reader.tied)
    everything = set().union(*(r.tensors for r in readers))
    for label, reader in zip(labels, readers, strict=True):
        if absent := sorted(everything - set(reader.tensors)):
            out.missing[label] = absent
    if out.missing:
        LOG.warning("tensors missing from some models are left out: %s", out.missing)
    for name in sorted(set(base.tensors).intersection(*(m.tensors for m in models))):
        infos = [r.tensors[name] for r in readers]
        if not all(i.is_float for i in infos):
            out.skipped.append(name)
            continue
        shape = infos[0].shape
        if all(i.shape == shape for i in infos):
            out.tensors.append((name, infos[0].numel))
            continue
        bad = next(i.shape for i in infos if i.shape != shape)
        if not shape or len(bad) != len(shape) or bad[1:] != shape[1:]:
            raise ValueError(
                f"tensor '{name}' has shape {list(bad)} in a model but {list(shape)} in the base: "
                "the models do not share the base's architecture"
            )
        rows = [i.shape[0] for i in infos]
        if vocab_mismatch == "error":
            raise ValueError(
                f"tensor '{name}': vocabulary sizes differ (rows {rows}, base first); "
                "use vocab_mismatch='shared_rows' to compare the shared rows"
            )
        out.truncated.append(name)
        out.tensors.append((name, min(rows) * math.prod(shape[1:])))
    if out.truncated:
        LOG.warning(
            "vocabulary sizes differ; comparing only the shared rows of: %s",
            ", ".join(out.truncated),
        )
    if not out.tensors:
        raise ValueError("the models share no floating-point tensor with the base")
    return out


class Chunk(NamedTuple):
    """Aligned 1-D views of one chunk of a tensor, as stored (`SafetensorsModel.view`), and the
    safetensors dtype of each (base first). Valid only until the iterator advances (their pages
    are released then): convert or copy, don't keep."""

    name: str
    base: np.ndarray
    models: tuple[np.ndarray, ...]
    dtypes: tuple[str, ...]


def iter_chunks(
    base: SafetensorsModel,
    models: Sequence[SafetensorsModel],
    tensor_plan: Plan,
    *,
    chunk_elems: int = 1 << 24,
    progress: bool = False,
) -> Iterator[Chunk]:
    """Yield (name, base_chunk, model_chunks) over the planned tensors, chunk by chunk."""
    from tqdm.auto import tqdm

    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be positive, got {chunk_elems}")
    readers = [base, *models]
    spans = [
        (name, start, min(count, start + chunk_elems))
        for name, count in tensor_plan.tensors
        for start in range(0, count, chunk_elems)
    ]
    n_tensors = len({name for name, _, _ in spans})
    bar = tqdm(total=n_tensors, desc="kinship", unit="tensor", disable=not progress)
    with bar:
        for k, (name, start, stop) in enumerate(spans):
            if k + 1 < len(spans):
                for r in readers:
                    r.prefetch(*spans[k + 1])
            yield Chunk(
                name,
                base.view(name, start, stop),
                tuple(m.view(name, start, stop) for m in models),
                tuple(r.tensors[name].dtype for r in readers),
            )
            for r in readers:
                r.release(name, start, stop)
            if k + 1 == len(spans) or spans[k + 1][0] != name:
                bar.update()


@functools.cache
def _float8_table(dtype: str) -> np.ndarray:
    """float32 value of each of the 256 bit patterns of an OCP 8-bit float: E4M3 has no
    infinities and NaN at S.1111.111; E5M2 follows IEEE (infinities, NaNs at exponent 11111)."""
    exponent_bits, ieee = {"F8_E4M3": (4, False), "F8_E5M2": (5, True)}[dtype]
    mantissa_bits = 7 - exponent_bits
    bias, top, full = 2 ** (exponent_bits - 1) - 1, 2**exponent_bits - 1, 2**mantissa_bits - 1
    table = np.empty(256, np.float32)
    for bits in range(256):
        exp, man = (bits >> mantissa_bits) & top, bits & full
        if exp == top and (ieee or man == full):
            value = math.inf if ieee and not man else math.nan
        elif exp == 0:  # subnormal
            value = man / 2**mantissa_bits * 2.0 ** (1 - bias)
        else:
            value = (1 + man / 2**mantissa_bits) * 2.0 ** (exp - bias)
        table[bits] = -value if bits & 0x80 else value
    return table


def decode(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """A view from `SafetensorsModel.view` as floats, into float32 `out` if given (exact for all
    but F64), else a new float32 array (float64 for F64)."""
    if out is None:
        out = np.empty(raw.shape, np.float64 if dtype == "F64" else np.float32)
    if dtype == "BF16":  # bf16 is the top half of a float32: widen the bits, shift into place
        np.left_shift(raw, np.uint32(16), out=out.view(np.uint32))
    elif dtype in ("F8_E4M3", "F8_E5M2"):
        np.take(_float8_table(dtype), raw, out=out)
    else:
        np.copyto(out, raw, casting="same_kind")
    return out


def torch_dtypes() -> dict[str, Any]:
    """safetensors dtype -> torch dtype, for a torch backend (imports torch)."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }
