"""The few array operations kinship's streaming arithmetic needs, for numpy (CPU) and torch (CUDA).

tasks/kinship.py writes its one algorithm against these: on the CPU numpy does it (importing
torch costs 2-3 s of CPU, more than the arithmetic of a 0.5B pair), on CUDA torch does it. The
two differ only in how they run a GEMM over small blocks and where the data lives:

    asarray(raw, dtype)  the chunk as read from the file, on the backend's device
    load(raw, srcs, dtypes) decode a column range of each source into a row of `raw` (bf16/f8
                         bit patterns included), the columns in any order common to all rows:
                         every sum here is over all columns, whatever their order
    subtract(a, b, out)
    dots(a, b)           float64 (ka, kb): Σ over n of a[:, n, :] · b[:, n, :]ᵀ, where each block
                         product is in the rows' dtype and the blocks are summed in float64
    gram(a)              dots(a, a), symmetric
    squares(a)           its diagonal alone
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from tasks.delta import decode


class NumpyArrays:
    """CPU: float32 rows, decoded from the mapped file without copies in between."""

    device = "cpu"
    exact = False  # float32 rows; the caller keeps each product within a short block
    row_dtype = np.float32

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float64)

    def empty(self, shape: tuple[int, int]) -> np.ndarray:
        return np.empty(shape, self.row_dtype)

    def ones(self, width: int) -> np.ndarray:
        return np.ones((1, 1, width), self.row_dtype)

    def asarray(self, raw: np.ndarray, dtype: str) -> np.ndarray:
        return raw

    def load(self, raw: np.ndarray, sources: list[np.ndarray], dtypes: Sequence[str]) -> None:
        width = raw.shape[1]
        if width % 2 or any(d != "BF16" for d in dtypes):
            for dst, src, dtype in zip(raw, sources, dtypes, strict=True):
                decode(src, dtype, out=dst)
            return
        # Two bf16 as one uint32 (little-endian): the first shifted up, the second masked give
        # the even columns, then the odd ones: no widening cast, 40% faster (measured)
        half = width // 2
        for dst, src in zip(raw, sources, strict=True):
            pairs, out = src.view(np.uint32), dst.view(np.uint32)
            np.left_shift(pairs, np.uint32(16), out=out[:half])
            np.bitwise_and(pairs, np.uint32(0xFFFF0000), out=out[half:])

    def subtract(self, a: np.ndarray, b: np.ndarray, *, out: np.ndarray) -> None:
        np.subtract(a, b, out=out)

    def blocks(self, rows: np.ndarray, width: int) -> np.ndarray:
        return rows.reshape(rows.shape[0], -1, width)  # a view: each row is contiguous

    # np.vecdot: one BLAS dot per block (float32 within it, several SIMD partial sums), a row
    # against many rows in one call: 1.4x faster than a call per pair, and from 8 rows on about
    # as fast as torch's small GEMMs. A stacked np.matmul over the blocks was faster for many rows
    # but 16x less precise (2e-7 vs 1.4e-8 relative on the tests' 7-model matrix, measured).
    def dots(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.stack([np.vecdot(a, row).sum(1, dtype=np.float64) for row in b], axis=1)

    def gram(self, a: np.ndarray) -> np.ndarray:
        out = np.empty((len(a), len(a)))
        for i in range(len(a)):
            column = np.vecdot(a[: i + 1], a[i]).sum(1, dtype=np.float64)
            out[i, : i + 1] = out[: i + 1, i] = column
        return out

    def squares(self, a: np.ndarray) -> np.ndarray:
        return np.vecdot(a, a).sum(1, dtype=np.float64)

    def tolist(self, x: np.ndarray) -> Any:
        return x.tolist()


class TorchArrays:
    """A torch device (CUDA): the file's dtype is shipped, then float64 rows over whole chunks."""

    exact = True  # float64 rows: no blocking needed for the precision

    def __init__(self, device: str) -> None:
        import torch

        from tasks.delta import torch_dtypes

        self.torch, self.torch_dtypes = torch, torch_dtypes()
        self.device = device
        self.row_dtype = torch.float64

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.torch.zeros(shape, dtype=self.torch.float64, device=self.device)

    def empty(self, shape: tuple[int, int]) -> Any:
        return self.torch.empty(shape, dtype=self.row_dtype, device=self.device)

    def ones(self, width: int) -> Any:
        return self.torch.ones((1, 1, width), dtype=self.row_dtype, device=self.device)

    def asarray(self, raw: np.ndarray, dtype: str) -> Any:
        with warnings.catch_warnings():
            # the map is read-only and nobody writes through the tensor
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = self.torch.from_numpy(raw).view(self.torch_dtypes[dtype])
        return tensor.to(self.device)  # ship the file dtype, convert there

    def load(self, raw: Any, sources: list[Any], dtypes: Sequence[str]) -> None:
        for dst, src in zip(raw, sources, strict=True):
            dst.copy_(src)

    def subtract(self, a: Any, b: Any, *, out: Any) -> None:
        self.torch.sub(a, b, out=out)

    def blocks(self, rows: Any, width: int) -> Any:
        return rows.view(rows.shape[0], -1, width)

    def dots(self, a: Any, b: Any) -> Any:
        prod = a.transpose(0, 1) @ b.transpose(0, 1).transpose(-1, -2)
        return prod.sum(0, dtype=self.torch.float64)

    def gram(self, a: Any) -> Any:
        """For 4+ rows only the lower block triangle ([all]·[first half]ᵀ and [second half]·
        [second half]ᵀ): the small-matrix GEMM is flop-bound, so this saves ~20%."""
        k = a.shape[0]
        if k < 4:
            return self.dots(a, a)
        h = k // 2
        out = self.torch.empty((k, k), dtype=self.torch.float64, device=a.device)
        out[:, :h] = self.dots(a, a[:h])
        out[h:, h:] = self.dots(a[h:], a[h:])
        out[:h, h:] = out[h:, :h].T
        return out

    def squares(self, a: Any) -> Any:
        return self.torch.linalg.vecdot(a, a).sum(-1, dtype=self.torch.float64)

    def tolist(self, x: Any) -> Any:
        return x.tolist()


Arrays = NumpyArrays | TorchArrays


def arrays_for(device: str) -> Arrays:
    """numpy on the CPU, torch on a CUDA device."""
    return NumpyArrays() if device == "cpu" else TorchArrays(device)
