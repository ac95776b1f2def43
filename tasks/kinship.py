"""Model kinship (arXiv 2410.12613): similarity of two models' delta parameters against a shared
base, exact and streaming, for a pair or a whole population.

One pass over the tensors (tasks.delta streams them from memory-mapped safetensors) accumulates,
in float64, the per-row sums Σr_k and the Gram matrix G_kl = Σ r_k·r_l of a few rows: the deltas
x_i = model_i − base and, for the pairs whose ED must be exact, a_i − a_j. Every metric of every
pair follows from those sums, over the concatenated deltas of all shared float tensors:

    PCC = (nΣxy − ΣxΣy) / sqrt((nΣx² − (Σx)²)(nΣy² − (Σy)²))
    CS  = Σxy / sqrt(Σx² Σy²)        signed; abs_cosine=True gives the reference's |cos|
    ED  = sqrt(Σ(x − y)²)            the global L2 distance (lower = more similar)

Where. On the CPU numpy does the arithmetic (torch is not imported: its import alone costs more
CPU than a 0.5B pair), on CUDA torch; tasks.arrays holds the few operations that differ.

Precision. On CPU the columns go through float32 in cache-sized sub-blocks (the difference of two
bf16 weights of similar size is exact there), each dot product runs over at most BLOCK = 512
elements, and the block results are summed in float64, so the error does not grow with the model
size (the reference's float32 sums over 5e8 values drift by 0.08 in PCC). Measured against
float64 on bf16 deltas: ~1e-8 relative. (BLOCK matters: the float32 GEMM's error grows with its
inner length and, on bf16 deltas, is biased: −1.4e-7 at 4096, −9e-7 at 16384, measured.) On CUDA
the rows are float64 throughout.

ED of a pair uses Σ(x − y)² directly. The matrix derives ED from the Gram, ED² = G_ii + G_jj −
2G_ij, whose absolute error is ~1e-8·(G_ii + G_jj): fine unless the two deltas nearly coincide.
Pairs where that relative ED error could pass ED_TARGET = 3e-7 (on CPU: ED² < 0.017·(G_ii + G_jj),
i.e. CS above ~0.98 for equal norms; on CUDA, in float64, only near-duplicates) are recomputed
with a direct Σ(x_i − x_j)² in one extra pass over just the models involved.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tasks.arrays import Arrays, arrays_for
from tasks.core.device import resolve_device, running_step
from tasks.core.store import stable_hash
from tasks.delta import Chunk, SafetensorsModel, iter_chunks, plan
from tasks.select import KINSHIP_METRICS as METRICS

LOG = logging.getLogger(__name__)
DEFAULT_CHUNK = 1 << 24
BLOCK = 512  # float32 products summed over at most this many elements before float64
CACHE_ELEMS = 1 << 20  # float32 working set of a CPU sub-block (raw + delta rows × columns):
# 4 MB, ~10% faster than 8 MB or 2 MB with numpy here (1 MB L2 per core, 32 MB L3; measured)
# relative error of a Gram entry vs sqrt(G_ii·G_jj), by exact (float64 rows): measured for
# float32 blocks, float64 rounding
GRAM_EPS = {False: 1e-8, True: 1e-15}
ED_TARGET = 3e-7  # matrix: direct ED for pairs whose Gram-derived ED could be worse than this


def check_metrics(metrics: Sequence[str] | str) -> list[str]:
    """Validate metric names; accepts a list or a 'pcc,cs,ed' / 'pcc ed' string."""
    if isinstance(metrics, str):
        metrics = [m for m in re.split(r"[,\s]+", metrics) if m]
    metrics = [m.lower() for m in metrics]
    if not metrics:
        raise ValueError(f"no kinship metric given: choose from {', '.join(METRICS)}")
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown kinship metric '{m}': choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(metrics))


class Sums:
    """float64 count, row sums and Gram matrix of the N delta rows, and the squared norms of the
    diff rows (all their ED needs), streamed column block by block.

    float32 rows go in blocks of BLOCK columns (each product within a block, the blocks summed in
    float64); float64 rows (CUDA) in one block. The row sums are products with ones, blocked alike.
    """

    def __init__(self, n: int, n_diffs: int, xp: Arrays) -> None:
        self.xp, self.n, self.count = xp, n, 0
        self.eps = GRAM_EPS[xp.exact]
        self.total = xp.zeros((n,))
        self.gram = xp.zeros((n, n))
        self.squares = xp.zeros((n_diffs,))

    def add(self, rows: Any) -> None:
        width = rows.shape[1]
        self.count += width
        block = width if self.xp.exact else BLOCK
        full = width - width % block
        for part, size in ((rows[:, :full], block), (rows[:, full:], width - full)):
            if size:
                blocks = self.xp.blocks(part, size)
                deltas, diffs = blocks[: self.n], blocks[self.n :]
                self.total += self.xp.dots(deltas, self.xp.ones(size))[:, 0]
                self.gram += self.xp.gram(deltas)
                if len(diffs):
                    self.squares += self.xp.squares(diffs)

    def merge(self, other: Sums) -> None:
        self.count += other.count
        self.total += other.total
        self.gram += other.gram
        self.squares += other.squares


class Rows:
    """Turns chunks into rows [x_1 .. x_N, a_i − a_j for each diff pair] and feeds Sums. With a
    thread pool, float32 sub-blocks of a chunk are split among its threads (numpy releases the
    GIL in each operation), each with its own buffers and Sums, merged in a fixed order."""

    def __init__(
        self,
        n_models: int,
        diffs: Sequence[tuple[int, int]],
        xp: Arrays,
        pool: ThreadPoolExecutor | None = None,
        threads: int = 1,
    ) -> None:
        self.xp, self.pool, self.threads = xp, pool, threads if pool else 1
        self.n, self.diffs = n_models, list(diffs)
        self.k = n_models + len(self.diffs)
        # float64 (CUDA): whole chunks. float32 (CPU): sub-blocks that stay in cache.
        per_column = n_models + 1 + self.k
        self.step = None if xp.exact else max(1, CACHE_ELEMS // per_column)
        if self.step and self.step > BLOCK:
            self.step -= self.step % BLOCK
        self._buffers: dict[int, tuple[Any, Any]] = {}  # thread part -> (raw, rows)

    def _rows(self, part: int, width: int) -> tuple[Any, Any]:
        if part not in self._buffers or self._buffers[part][0].shape[1] < width:
            raw, rows = self.xp.empty((self.n + 1, width)), self.xp.empty((self.k, width))
            self._buffers[part] = raw, rows
        raw, rows = self._buffers[part]
        return raw[:, :width], rows[:, :width]

    def feed(self, chunk: Chunk, sums: Sums) -> None:
        sources = [chunk.base, *chunk.models]
        sources = [self.xp.asarray(s, d) for s, d in zip(sources, chunk.dtypes, strict=True)]
        size = len(chunk.base)
        starts = range(0, size, self.step or size)
        parts = min(len(starts), self.threads)
        if parts == 1:
            self._feed(0, sources, chunk.dtypes, starts, size, sums)
            return
        cuts = [len(starts) * p // parts for p in range(parts + 1)]
        partial = [Sums(self.n, len(self.diffs), self.xp) for _ in range(parts)]

        def run(p: int) -> None:
            self._feed(p, sources, chunk.dtypes, starts[cuts[p] : cuts[p + 1]], size, partial[p])

        list(self.pool.map(run, range(parts)))  # type: ignore[union-attr]
        for one in partial:
            sums.merge(one)

    def _feed(
        self,
        part: int,
        sources: list[Any],
        dtypes: Sequence[str],
        starts: range,
        size: int,
        sums: Sums,
    ) -> None:
        for start in starts:
            width = min(self.step or size, size - start)
            raw, rows = self._rows(part, width)
            self.xp.load(raw, [src[start : start + width] for src in sources], dtypes)
            self.xp.subtract(raw[1:], raw[:1], out=rows[: self.n])
            for d, (i, j) in enumerate(self.diffs):
                # a_i − a_j straight from the weights: one rounding, not two
                self.xp.subtract(raw[i + 1], raw[j + 1], out=rows[self.n + d])
            sums.add(rows)


def accumulate(
    models: Sequence[Path | str],
    base: Path | str,
    *,
    diffs: Sequence[tuple[int, int]] = (),
    device: str = "cpu",
    vocab_mismatch: str = "shared_rows",
    chunk_elems: int = DEFAULT_CHUNK,
    progress: bool = False,
    per_tensor: bool = False,
    threads: int = 1,
) -> tuple[Sums, dict[str, Sums], Any]:
    """One streaming pass: the global Sums, per-tensor Sums (if asked) and the tensor plan;
    `threads` share the CPU arithmetic (not CUDA's)."""
    where = resolve_device(device)
    if where != "cpu" and not where.startswith("cuda"):  # MPS has no float64 for the sums
        LOG.warning("kinship: device %s unsupported, computing on the CPU", where)
        where = "cpu"
    xp = arrays_for(where)
    base_reader = SafetensorsModel(base)
    readers = [SafetensorsModel(m) for m in models]
    labels = [str(base), *(str(m) for m in models)]
    tensor_plan = plan(base_reader, readers, labels, vocab_mismatch)
    tensors: dict[str, Sums] = {}
    chunks = iter_chunks(
        base_reader, readers, tensor_plan, chunk_elems=chunk_elems, progress=progress
    )
    parallel = threads > 1 and not xp.exact
    with ThreadPoolExecutor(threads) if parallel else contextlib.nullcontext() as pool:
        rows = Rows(len(readers), diffs, xp, pool, threads)
        total = Sums(rows.n, len(rows.diffs), xp)
        for chunk in chunks:
            if per_tensor:
                if chunk.name not in tensors:
                    tensors[chunk.name] = Sums(rows.n, len(rows.diffs), xp)
                rows.feed(chunk, tensors[chunk.name])
            else:
                rows.feed(chunk, total)
    for sums in tensors.values():
        total.merge(sums)
    return total, tensors, tensor_plan


def _metrics(
    sums: Sums,
    pairs: Sequence[tuple[int, int]],
    metrics: Sequence[str],
    abs_cosine: bool,
    diff: int | None = None,
) -> list[dict[str, float]]:
    """Metrics of each pair (i, j) of delta rows; ED from diff row `diff` (x_i − x_j) if given."""
    n = float(sums.count)
    total, gram = sums.xp.tolist(sums.total), sums.xp.tolist(sums.gram)
    results = []
    for i, j in pairs:
        sx, sy = total[i], total[j]
        xx, yy, xy = gram[i][i], gram[j][j], gram[i][j]
        out: dict[str, float] = {}
        if "pcc" in metrics:
            var = (xx - sx * sx / n) * (yy - sy * sy / n) if n else 0.0
            out["pcc"] = (xy - sx * sy / n) / math.sqrt(var) if var > 0 else math.nan
        if "cs" in metrics:
            norm = math.sqrt(xx * yy)
            cs = xy / norm if norm > 0 else math.nan
            out["cs"] = abs(cs) if abs_cosine else cs
        if "ed" in metrics:
            if i == j:
                out["ed"] = 0.0
            elif diff is not None:
                out["ed"] = math.sqrt(float(sums.squares[diff]))
            else:
                out["ed"] = math.sqrt(max(0.0, xx + yy - 2 * xy))
        results.append(out)
    return results


def kinship(
    model_a: Path,
    model_b: Path,
    base: Path,
    metrics: Sequence[str] = METRICS,
    *,
    device: str = "cpu",
    abs_cosine: bool = False,
    vocab_mismatch: str = "shared_rows",
    per_tensor: bool = False,
    chunk_elems: int = DEFAULT_CHUNK,
    progress: bool = False,
    threads: int = 1,
) -> dict[str, Any]:
    """Kinship of two models against their shared base, in one streaming pass.

    Returns the requested metrics plus n_params (delta elements compared), n_tensors (tensors
    compared), skipped (non-float tensors), missing (label -> tensors it lacks), truncated
    (vocab-row mismatches), tied (stored copies of a tied embedding, left out: the shared matrix
    counts once), compared (all of that with a reason per tensor left out) and, with
    per_tensor, a breakdown {tensor: {metric: value, "n": elements}}; per-tensor values are a
    breakdown only (the global PCC/CS are not averages of them; ED² is their sum).
    """
    metrics = check_metrics(metrics)
    total, tensors, tensor_plan = accumulate(
        [model_a, model_b],
        base,
        diffs=[(0, 1)],
        device=device,
        vocab_mismatch=vocab_mismatch,
        chunk_elems=chunk_elems,
        progress=progress,
        per_tensor=per_tensor,
        threads=threads,
    )
    result: dict[str, Any] = _metrics(total, [(0, 1)], metrics, abs_cosine, diff=0)[0]
    result.update(
        n_params=total.count,
        n_tensors=len(tensor_plan.tensors),
        skipped=tensor_plan.skipped,
        missing=tensor_plan.missing,
        truncated=tensor_plan.truncated,
        tied=tensor_plan.tied,
        compared=tensor_plan.report(),
    )
    if per_tensor:
        result["per_tensor"] = {
            name: {**_metrics(s, [(0, 1)], metrics, abs_cosine, diff=0)[0], "n": s.count}
            for name, s in tensors.items()
        }
    return result


def kinship_matrix(
    models: Sequence[Path],
    base: Path,
    metrics: Sequence[str] = METRICS,
    *,
    device: str = "cpu",
    abs_cosine: bool = False,
    vocab_mismatch: str = "shared_rows",
    chunk_elems: int = DEFAULT_CHUNK,
    progress: bool = False,
    threads: int = 1,
) -> dict[str, list[list[float]]]:
    """metric -> N×N matrix over the tensors all N models share, reading each model once.

    Cost is linear in N for the reads and the sums; only the N×N Gram (tiny) is quadratic.
    """
    return kinship_matrix_compared(
        models,
        base,
        metrics,
        device=device,
        abs_cosine=abs_cosine,
        vocab_mismatch=vocab_mismatch,
        chunk_elems=chunk_elems,
        progress=progress,
        threads=threads,
    )[0]


def kinship_matrix_compared(
    models: Sequence[Path],
    base: Path,
    metrics: Sequence[str] = METRICS,
    *,
    device: str = "cpu",
    abs_cosine: bool = False,
    vocab_mismatch: str = "shared_rows",
    chunk_elems: int = DEFAULT_CHUNK,
    progress: bool = False,
    threads: int = 1,
) -> tuple[dict[str, list[list[float]]], dict[str, Any]]:
    """`kinship_matrix` and what it compared (`Plan.report`: tensors, parameters, and each
    tensor left out with why), which is also logged."""
    metrics = check_metrics(metrics)
    if len(models) < 2:
        raise ValueError("a kinship matrix needs at least two models")
    opts = {
        "device": device,
        "vocab_mismatch": vocab_mismatch,
        "chunk_elems": chunk_elems,
        "progress": progress,
        "threads": threads,
    }
    total, _, tensor_plan = accumulate(models, base, **opts)
    # on the console only when something was left out (the flow's console shows INFO of ours)
    left_out = tensor_plan.report()["skipped"] or tensor_plan.truncated
    LOG.log(
        logging.INFO if left_out else logging.DEBUG,
        "kinship of %d models: %s",
        len(models),
        tensor_plan.summary(),
    )
    n = len(models)
    out = {m: [[math.nan] * n for _ in range(n)] for m in metrics}
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    for (i, j), values in zip(pairs, _metrics(total, pairs, metrics, abs_cosine), strict=True):
        for m, v in values.items():
            out[m][i][j] = out[m][j][i] = v
    if "ed" in metrics:
        _exact_close_pairs(out["ed"], total, models, base, opts)
    for i in range(n):  # self-similarity is 1 by definition (NaN when the delta is zero)
        for m in ("pcc", "cs"):
            if m in out and not math.isnan(out[m][i][i]):
                out[m][i][i] = 1.0
    return out, tensor_plan.report()


def _exact_close_pairs(
    ed: list[list[float]],
    sums: Sums,
    models: Sequence[Path],
    base: Path,
    opts: dict[str, Any],
) -> None:
    """Replace Gram-derived ED by a direct Σ(x_i − x_j)² where cancellation could bite."""
    diag = sums.xp.tolist(sums.gram.diagonal())  # the diagonal is always computed
    # ED² error ≈ eps·(G_ii + G_jj); relative ED error is half that over ED²
    ratio = sums.eps / (2 * ED_TARGET)
    close = [
        (i, j)
        for i in range(len(models))
        for j in range(i + 1, len(models))
        if ed[i][j] ** 2 < ratio * (diag[i] + diag[j])
    ]
    if not close:
        return
    involved = sorted({k for pair in close for k in pair})
    where = {k: pos for pos, k in enumerate(involved)}
    diffs = [(where[i], where[j]) for i, j in close]
    LOG.debug("kinship: exact ED pass for %d near-identical pair(s)", len(close))
    again, _, _ = accumulate([models[k] for k in involved], base, diffs=diffs, **opts)
    for d, (i, j) in enumerate(close):
        ed[i][j] = ed[j][i] = math.sqrt(float(again.squares[d]))


def matrix_key(fingerprints: Sequence[str], base_fingerprint: str, options: dict[str, Any]) -> str:
    """Same models, same base, same options -> same matrix; where it ran does not count."""
    return "kinship-" + stable_hash(
        {
            "models": list(fingerprints),
            "base": base_fingerprint,
            "metrics": sorted(options["metrics"]),
            "abs_cosine": options["abs_cosine"],
            "vocab_mismatch": options["vocab_mismatch"],
        }
    )


# -- Prefect task ---------------------------------------------------------------------------------


def kinship_matrix_step(
    paths: list[str],
    fingerprints: list[str],
    base: str,
    base_fingerprint: str,
    options: dict[str, Any],
    device: str,
    threads: int = 1,
) -> dict[str, Any]:
    """`kinship_matrix` of a population (`fingerprints` key the cache); `compared` says which
    tensors and parameters it compared and which it left out, `ran` where it ran."""
    with running_step("kinship", threads, resolve_device(device)) as ran:
        matrix, compared = kinship_matrix_compared(
            [Path(p) for p in paths],
            Path(base),
            options["metrics"],
            device=device,
            abs_cosine=options["abs_cosine"],
            vocab_mismatch=options["vocab_mismatch"],
            chunk_elems=options["chunk_elems"],
            threads=ran["threads"],
        )
    return {**matrix, "compared": compared, "ran": ran}


def __getattr__(name: str) -> Any:
    """`kinship_matrix_task`, the step as a Prefect task, built on first access: importing Prefect
    takes about 1 s, a fifth of the kinship command's whole run, which needs the arithmetic only.
    `from tasks.kinship import kinship_matrix_task` works as for any module attribute."""
    if name != "kinship_matrix_task":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from prefect import task

    built = task(
        name="kinship",
        cache_key_fn=lambda _ctx, p: matrix_key(
            p["fingerprints"], p["base_fingerprint"], p["options"]
        ),
        persist_result=True,
    )(kinship_matrix_step)
    globals()[name] = built  # later lookups find it without coming back here
    return built
