"""Kinship engine against a float64 ground truth, on tiny Llama-shaped safetensors models."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tasks.kinship as kin
from flows.kinship import main
from tasks.arrays import TorchArrays
from tasks.delta import SafetensorsModel, decode, iter_chunks, plan
from tasks.kinship import kinship, kinship_matrix

VOCAB, HIDDEN, INTER, LAYERS = 100, 64, 160, 2
INT_TENSOR = "model.layers.0.self_attn.position_ids"


def llama_shapes(vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (vocab, HIDDEN)
    return shapes


def noise(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, name)))
    return torch.randn(shape, generator=g, dtype=torch.float64)


def write_model(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
) -> Path:
    folder.mkdir(parents=True)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def variant(
    base: dict[str, torch.Tensor], seed: int, shared: float = 0.6, scale: float = 0.02, **kw
) -> dict[str, torch.Tensor]:
    """base + correlated delta: a shared direction (seed 0) plus the variant's own noise."""
    out = {}
    for name, w in base.items():
        if not w.is_floating_point():
            out[name] = w
            continue
        delta = shared * noise(name, w.shape, 0) + noise(name, w.shape, seed) + kw.get("mean", 0.1)
        out[name] = w + scale * delta
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinship")
    bf16 = {n: noise(n, s, 99).bfloat16().double() for n, s in llama_shapes().items()}
    base = {**bf16, INT_TENSOR: torch.arange(16, dtype=torch.int64)}
    a, b = variant(base, 1), variant(base, 2)
    anti = {n: 2 * base[n] - a[n] if base[n].is_floating_point() else base[n] for n in base}
    tied = {n: v for n, v in variant(base, 3).items() if n != "lm_head.weight"}
    a_bf16 = {n: v.bfloat16().double() if v.is_floating_point() else v for n, v in a.items()}
    near = {
        n: v + 1e-5 * noise(n, v.shape, 4) if v.is_floating_point() else v
        for n, v in a_bf16.items()
    }
    big_vocab = variant({n: noise(n, s, 99) for n, s in llama_shapes(VOCAB + 12).items()}, 5)
    odd = dict(variant(base, 6))
    odd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(INTER, HIDDEN // 2)
    models = {
        "base": write_model(root / "base", base),
        "a": write_model(root / "a", a, shards=2),
        "b": write_model(root / "b", b),
        "anti": write_model(root / "anti", anti),
        "tied": write_model(root / "tied", tied, dtype=torch.float32),
        "near": write_model(root / "near", near, dtype=torch.float32),
        "big_vocab": write_model(root / "big_vocab", big_vocab),
        "odd": write_model(root / "odd", odd),
    }
    return models


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def truth(a: Path, b: Path, base: Path, names: list[str] | None = None) -> dict[str, float]:
    """float64 over fully loaded, concatenated deltas (shared float tensors, shared rows)."""
    ta, tb, t0 = load(a), load(b), load(base)
    keys = names or sorted(k for k in set(ta) & set(tb) & set(t0) if t0[k].is_floating_point())
    xs, ys = [], []
    for k in keys:
        rows = min(ta[k].shape[0], tb[k].shape[0], t0[k].shape[0]) if t0[k].dim() else None
        w0 = t0[k].double()[:rows].flatten()
        xs.append(ta[k].double()[:rows].flatten() - w0)
        ys.append(tb[k].double()[:rows].flatten() - w0)
    x, y = torch.cat(xs), torch.cat(ys)
    xc, yc = x - x.mean(), y - y.mean()
    return {
        "pcc": (xc @ yc / (xc.norm() * yc.norm())).item(),
        "cs": (x @ y / (x.norm() * y.norm())).item(),
        "ed": (x - y).norm().item(),
        "n": x.numel(),
    }


def assert_close(got: dict, want: dict, rel: float = 1e-6, metrics=kin.METRICS) -> None:
    for m in metrics:
        assert got[m] == pytest.approx(want[m], rel=rel), (m, got[m], want[m])


@pytest.mark.parametrize("chunk_elems", [1 << 24, 1000, 4096 + 7])
def test_pair_matches_float64_truth(zoo: dict[str, Path], chunk_elems: int) -> None:
    got = kinship(zoo["a"], zoo["b"], zoo["base"], chunk_elems=chunk_elems)
    want = truth(zoo["a"], zoo["b"], zoo["base"])
    assert_close(got, want)
    assert got["n_params"] == want["n"]
    assert got["skipped"] == [INT_TENSOR]
    assert got["missing"] == {} and got["truncated"] == []
    assert 0.1 < got["pcc"] < 0.9  # a real correlation, not a degenerate case


def test_many_sub_blocks_and_tails(zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # sub-blocks smaller than a tensor (shared among threads), float32 blocks of BLOCK plus tails
    monkeypatch.setattr(kin, "CACHE_ELEMS", 6 * 5000)
    monkeypatch.setattr(kin, "BLOCK", 128)
    args, opts = (zoo["a"], zoo["b"], zoo["base"]), {"chunk_elems": 7777, "per_tensor": True}
    one, many = kinship(*args, **opts), kinship(*args, **opts, threads=3)
    assert_close(one, truth(*args))
    assert_close(many, one, rel=1e-12)  # the same blocks, float64 sums in another order
    for name, values in one["per_tensor"].items():
        assert_close(many["per_tensor"][name], values, rel=1e-12)


def test_float64_rows_path(zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA code path (torch, float64 rows, whole chunks), exercised on CPU."""
    monkeypatch.setattr(kin, "arrays_for", lambda device: TorchArrays("cpu"))
    got = kinship(zoo["a"], zoo["b"], zoo["base"], chunk_elems=5000)
    assert_close(got, truth(zoo["a"], zoo["b"], zoo["base"]), rel=1e-12)


@pytest.mark.parametrize("vocab_mismatch", ["shared_rows", "error"])
def test_numpy_and_torch_paths_agree(
    zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, vocab_mismatch: str
) -> None:
    """CPU (numpy, float32 blocks) and CUDA's arithmetic (torch, float64; run on the CPU here)
    give the same pair and matrix, every metric, to ~1e-8."""
    b = zoo["big_vocab"] if vocab_mismatch == "shared_rows" else zoo["b"]
    # repeated models: the exact-ED pass too
    models = [zoo["a"], b, zoo["anti"], zoo["near"], zoo["a"], b, zoo["anti"]]
    opts = {"vocab_mismatch": vocab_mismatch, "chunk_elems": 4096 + 7}

    def both() -> tuple[dict, dict]:
        return kinship(zoo["a"], b, zoo["base"], per_tensor=True, **opts), kinship_matrix(
            models, zoo["base"], **opts
        )

    numpy_pair, numpy_matrix = both()
    monkeypatch.setattr(kin, "arrays_for", lambda device: TorchArrays("cpu"))
    torch_pair, torch_matrix = both()
    assert_close(numpy_pair, torch_pair, rel=3e-8)
    for name, values in torch_pair["per_tensor"].items():  # small tensors: fewer digits
        assert_close(numpy_pair["per_tensor"][name], values, rel=1e-6)
    for m in kin.METRICS:
        assert np.allclose(numpy_matrix[m], torch_matrix[m], rtol=3e-8, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA on this worker")
def test_cuda_matches_cpu(zoo: dict[str, Path]) -> None:
    args = (zoo["a"], zoo["b"], zoo["base"])
    assert_close(kinship(*args, device="cuda"), kinship(*args, device="cpu"))
    gpu = kinship_matrix([zoo["a"], zoo["b"], zoo["anti"]], zoo["base"], device="cuda")
    cpu = kinship_matrix([zoo["a"], zoo["b"], zoo["anti"]], zoo["base"], device="cpu")
    for m in kin.METRICS:
        assert torch.allclose(torch.tensor(gpu[m]), torch.tensor(cpu[m]), rtol=1e-6)


def test_signed_and_reference_abs_cosine(zoo: dict[str, Path]) -> None:
    signed = kinship(zoo["a"], zoo["anti"], zoo["base"], ["cs", "pcc"])
    absolute = kinship(zoo["a"], zoo["anti"], zoo["base"], ["cs"], abs_cosine=True)
    want = truth(zoo["a"], zoo["anti"], zoo["base"])
    assert signed["cs"] < -0.9 and signed["pcc"] < -0.9
    assert signed["cs"] == pytest.approx(want["cs"], rel=1e-6)
    # the reference: sqrt(dot(a, b)**2 / (dot(a, a) * dot(b, b)))
    ta, tb, t0 = load(zoo["a"]), load(zoo["anti"]), load(zoo["base"])
    keys = [k for k in t0 if t0[k].is_floating_point()]
    x = torch.cat([(ta[k].double() - t0[k].double()).flatten() for k in keys]).numpy()
    y = torch.cat([(tb[k].double() - t0[k].double()).flatten() for k in keys]).numpy()
    reference = math.sqrt(x.dot(y) ** 2 / (x.dot(x) * y.dot(y)))
    assert absolute["cs"] == pytest.approx(reference, rel=1e-6)
    positive = kinship(zoo["a"], zoo["b"], zoo["base"], ["cs"], abs_cosine=True)
    assert positive["cs"] == pytest.approx(truth(zoo["a"], zoo["b"], zoo["base"])["cs"], rel=1e-6)


def test_per_tensor_breakdown(zoo: dict[str, Path]) -> None:
    got = kinship(zoo["a"], zoo["b"], zoo["base"], per_tensor=True, chunk_elems=3000)
    parts = got["per_tensor"]
    assert INT_TENSOR not in parts and len(parts) == len(llama_shapes())
    assert sum(p["n"] for p in parts.values()) == got["n_params"]
    assert sum(p["ed"] ** 2 for p in parts.values()) == pytest.approx(got["ed"] ** 2, rel=1e-9)
    for name in ("lm_head.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
        assert_close(parts[name], truth(zoo["a"], zoo["b"], zoo["base"], [name]))
    # the breakdown does not change the global values
    assert_close(got, kinship(zoo["a"], zoo["b"], zoo["base"]))


def test_matrix_equals_pairwise(zoo: dict[str, Path]) -> None:
    models = [zoo["a"], zoo["b"], zoo["anti"], zoo["near"]]
    matrix = kinship_matrix(models, zoo["base"], chunk_elems=5000)
    for i in range(len(models)):
        assert matrix["pcc"][i][i] == 1.0 and matrix["cs"][i][i] == 1.0 and matrix["ed"][i][i] == 0
        for j in range(len(models)):
            if i != j:
                pair = kinship(models[i], models[j], zoo["base"])
                assert_close({m: matrix[m][i][j] for m in kin.METRICS}, pair)
                assert_close(pair, truth(models[i], models[j], zoo["base"]))


def test_matrix_near_identical_ed_is_exact(
    zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    accumulate = kin.accumulate
    monkeypatch.setattr(kin, "accumulate", lambda *a, **k: calls.append(k) or accumulate(*a, **k))
    models = [zoo["a"], zoo["b"], zoo["near"], zoo["a"]]
    matrix = kinship_matrix(models, zoo["base"], ["ed"])
    assert matrix["ed"][0][3] == 0.0  # the same model twice
    want = truth(zoo["a"], zoo["near"], zoo["base"])["ed"]
    assert matrix["ed"][0][2] == pytest.approx(want, rel=1e-6)
    assert matrix["ed"][2][3] == pytest.approx(want, rel=1e-6)
    assert len(calls) == 2 and len(calls[1]["diffs"]) == 3  # (a,near), (a,a'), (near,a')


def test_missing_tensor_is_reported(zoo: dict[str, Path]) -> None:
    got = kinship(zoo["a"], zoo["tied"], zoo["base"])
    assert got["missing"] == {str(zoo["tied"]): ["lm_head.weight"]}
    keys = [k for k in llama_shapes() if k != "lm_head.weight"]
    assert_close(got, truth(zoo["a"], zoo["tied"], zoo["base"], keys))
    # a weight-tied pair (neither has lm_head) against a base that has one
    tied_tied = kinship(zoo["tied"], zoo["tied"], zoo["base"])
    assert tied_tied["pcc"] == pytest.approx(1.0) and tied_tied["ed"] == 0.0


def test_vocab_mismatch(zoo: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tasks.delta"):
        got = kinship(zoo["a"], zoo["big_vocab"], zoo["base"])
    assert got["truncated"] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert "lm_head.weight" in caplog.text and "model.embed_tokens.weight" in caplog.text
    assert_close(got, truth(zoo["a"], zoo["big_vocab"], zoo["base"]))
    assert got["n_params"] == truth(zoo["a"], zoo["b"], zoo["base"])["n"]
    with pytest.raises(ValueError, match="embed_tokens|lm_head"):
        kinship(zoo["a"], zoo["big_vocab"], zoo["base"], vocab_mismatch="error")


def test_shape_mismatch_names_the_tensor(zoo: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        kinship(zoo["a"], zoo["odd"], zoo["base"])


def test_unknown_metric(zoo: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"'kl'.*pcc, cs, ed"):
        kinship(zoo["a"], zoo["b"], zoo["base"], ["pcc", "kl"])
    with pytest.raises(ValueError, match="'kl'"):
        kinship_matrix([zoo["a"], zoo["b"]], zoo["base"], ["kl"])


def test_only_requested_metrics(zoo: dict[str, Path]) -> None:
    got = kinship(zoo["a"], zoo["b"], zoo["base"], ["ed"])
    assert "ed" in got and "pcc" not in got and "cs" not in got
    assert set(kinship_matrix([zoo["a"], zoo["b"]], zoo["base"], ["pcc"])) == {"pcc"}


def test_chunks_are_bounded(zoo: dict[str, Path]) -> None:
    base, model = SafetensorsModel(zoo["base"]), SafetensorsModel(zoo["a"])
    p = plan(base, [model], ["base", "a"])
    seen = 0
    for chunk in iter_chunks(base, [model], p, chunk_elems=999):
        assert chunk.base.size == chunk.models[0].size <= 999
        assert chunk.dtypes == ("BF16", "BF16")
        seen += chunk.base.size
    assert seen == p.n_elems


def test_auto_device_without_a_gpu_driver_is_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.core.device import gpu_driver_visible, resolve_device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides every GPU, for torch as for us
    assert not gpu_driver_visible() and resolve_device("auto") == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cli(zoo: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a, b, base = (str(zoo[k]) for k in ("a", "b", "base"))
    assert main([a, b, base, "pcc,ed", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"pcc", "ed", "n_params"} and "cs" not in out
    assert main(["--matrix", a, b, str(zoo["anti"]), "--base", base, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["pcc"]) == 3 and out["models"][0] == a
    assert main([a, b, base, "pcc ed cs", "--no-progress"]) == 0
    assert "Model kinship (PCC)" in capsys.readouterr().out
    assert main([a, b, base, "pcc,kl"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_cli_imports_no_prefect_and_on_cpu_no_torch(zoo: dict[str, Path]) -> None:
    """The command needs the arithmetic only: Prefect (~1 s to import) stays out of its process,
    and on the CPU torch (2-3 s) too, while the flow still gets the step as a Prefect task."""
    a, b, base = (str(zoo[k]) for k in ("a", "b", "base"))
    code = (
        "import sys, flows.kinship\n"
        f"assert flows.kinship.main([{a!r}, {b!r}, {base!r}, '--device', 'cpu']) == 0\n"
        "assert 'prefect' not in sys.modules, 'prefect imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "from tasks.kinship import kinship_matrix_task\n"
        "assert kinship_matrix_task.name == 'kinship' and 'prefect' in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-500:]


def test_unpadded_header_is_read(tmp_path: Path) -> None:
    """Old writers did not pad the JSON header: tensor data may start at an odd offset."""
    values = torch.arange(10, dtype=torch.float32).bfloat16()
    header = {"w": {"dtype": "BF16", "shape": [2, 5], "data_offsets": [0, 20]}}
    blob = json.dumps(header).encode()
    blob += b" " * ((1 - len(blob)) % 2)  # 8 + len(blob) odd
    (tmp_path / "m").mkdir()
    raw = struct.pack("<Q", len(blob)) + blob + values.view(torch.int16).numpy().tobytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(raw)
    model = SafetensorsModel(tmp_path / "m")
    assert model.tensors["w"].offset % 2 == 1
    assert torch.equal(torch.from_numpy(decode(model.view("w", 3, 8), "BF16")), values[3:8].float())
