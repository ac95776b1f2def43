"""Tiny checkpoints of real model families (tests/checkpoints.py), and loading/evaluating them
through the pipeline: thread-safe `load_model` on tied models, `evaluate_model` on the zoo."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import FAMILIES, TIED, make_family, zoo_corpus

# How many concurrent tries make a pass meaningful. Measured on this 2-core machine
# (transformers 5.23, 3 threads, the llama_tied base + 2 variants): bench/concurrent_load.py
# plain from_pretrained + .to("cpu") failed in 44 of 50 tries (9/10, 10/10, 25/30), load_model
# without its lock in 10/10; this test's own helper with the lock removed failed (raised or left
# transformers' globals patched) in 78 of 100 tries (28/40, 50/60: it varies with machine load)
# and, run under pytest, at try 0, 1 and 2 of three runs. Taking p >= 0.5 per try, below every
# figure seen, 16 unlocked tries all pass with probability <= 0.5**16 = 1.5e-5 (0.22**16 = 3e-11
# at p = 0.78), so 16 passing tries show the lock, not luck. They take about 2 s.
CONCURRENT_TRIES = 16
N_THREADS = 3


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("families")
    return {family: make_family(root, family) for family in FAMILIES}


def _headers(folder: Path) -> dict[str, dict[str, Any]]:
    """Every tensor's safetensors header entry (dtype, shape, offsets), from all shards."""
    out: dict[str, dict[str, Any]] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with shard.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        out.update(header)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_layout(families: dict[str, dict[str, Any]], family: str) -> None:
    built = families[family]
    assert built["tied"] == (family in TIED)
    assert len(built["variants"]) == 2 and len(set(built["models"])) == 3
    for folder in built["models"]:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards
        headers = _headers(folder)
        assert set(headers) == set(index["weight_map"])
        assert {h["dtype"] for h in headers.values()} == {"BF16"}
        config = json.loads((folder / "config.json").read_text())
        assert config["dtype"] == "bfloat16"
        assert config["tie_word_embeddings"] is (family in TIED)
        assert ("lm_head.weight" in headers) is (family not in TIED)
        assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    if family == "phi3":
        assert "model.layers.0.self_attn.qkv_proj.weight" in headers
        assert "model.layers.0.mlp.gate_up_proj.weight" in headers
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in headers


@pytest.mark.parametrize("family", ["llama_tied", "gemma"])
def test_variants_are_kin_and_builds_deterministic(
    families: dict[str, dict[str, Any]], family: str, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            out.update(load_file(shard))
        return out

    base, ft1, ft2 = (weights(p) for p in families[family]["models"])
    for name in base:  # every float tensor moved, and differently per variant
        assert not torch.equal(ft1[name], base[name]) and not torch.equal(ft1[name], ft2[name])
    d1, d2 = (
        torch.cat([(v[k].double() - base[k].double()).flatten() for k in base]) for v in (ft1, ft2)
    )
    pcc = torch.corrcoef(torch.stack([d1, d2]))[0, 1].item()
    assert 0.3 < pcc < 0.7  # designed RHO = 0.5: related, not identical

    again = make_family(tmp_path, family)
    for first, second in zip(families[family]["models"], again["models"], strict=True):
        for path in sorted(first.iterdir()):
            assert path.read_bytes() == (second / path.name).read_bytes(), path.name
    other = weights(families["llama"]["base"])  # same seed, other family: other weights
    name = "model.embed_tokens.weight"
    assert other[name].shape == base[name].shape and not torch.equal(other[name], base[name])


def test_tokenizer_round_trips_zoo_text(
    families: dict[str, dict[str, Any]], micro_zoo: Path
) -> None:
    from transformers import AutoTokenizer

    from tasks.zoo.build import CHARS, load_manifest

    manifest = load_manifest(micro_zoo)
    texts = [CHARS, *zoo_corpus(seed=99, n_lines=200)]
    for task in manifest["tasks"]:
        data = micro_zoo / manifest["task_dir"] / f"{task}.jsonl"
        for line in data.read_text().splitlines():
            row = json.loads(line)
            texts += [row["prompt"] + choice for choice in row["choices"]]
    for family in ("llama", "gemma"):
        tokenizer = AutoTokenizer.from_pretrained(families[family]["base"])
        config = json.loads((families[family]["base"] / "config.json").read_text())
        assert 300 <= len(tokenizer) <= 500
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>")}
        assert tokenizer.bos_token_id == ids["<s>"] == config["bos_token_id"]
        assert tokenizer.eos_token_id == ids["</s>"] == config["eos_token_id"]
        assert tokenizer.pad_token_id == ids["<pad>"] == config["pad_token_id"]
        for text in texts:
            encoded = tokenizer(text)["input_ids"]
            assert tokenizer.decode(encoded) == text
        assert len(tokenizer("add 12+7=19")["input_ids"]) < len("add 12+7=19")  # merges learnt
        assert tokenizer.chat_template
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": "add 1+2="}], tokenize=False, add_generation_prompt=True
        )
        assert chat == "<s>user\nadd 1+2=</s>\n<s>assistant\n"


def _load_concurrently(paths: list[Path]) -> list[Any]:
    """`load_model(paths[i])` in thread i, all released at once: results or exceptions."""
    from tasks.evaluate import load_model

    barrier = threading.Barrier(len(paths))
    results: list[Any] = [None] * len(paths)

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = load_model(paths[i], "cpu", "float32")
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_load_model_is_thread_safe_on_tied_models(families: dict[str, dict[str, Any]]) -> None:
    import torch
    from transformers import PreTrainedModel

    paths = families["llama_tied"]["models"]
    assert len(paths) == N_THREADS
    tie_weights, default_dtype = PreTrainedModel.tie_weights, torch.get_default_dtype()
    for attempt in range(CONCURRENT_TRIES):
        results = _load_concurrently(paths)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        assert not errors, f"try {attempt}: {errors}"
        for model, tokenizer in results:
            head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
            assert head.device.type == "cpu" and head.data_ptr() == embed.data_ptr()
            assert model.dtype == torch.float32 and tokenizer.eos_token_id is not None
        # from_pretrained's process-wide patches were all undone
        assert PreTrainedModel.tie_weights is tie_weights
        assert torch.get_default_dtype() == default_dtype


def test_evaluate_model_on_tied_model(families: dict[str, dict[str, Any]], micro_zoo: Path) -> None:
    from tasks.evaluate import evaluate_model
    from tasks.zoo.build import load_manifest

    manifest = load_manifest(micro_zoo)
    tasks = list(manifest["tasks"])
    result = evaluate_model(
        families["gemma"]["base"], tasks, micro_zoo / manifest["task_dir"], batch_size=64
    )
    assert set(result["scores"]) == set(tasks)
    assert all(0.0 <= s <= 1.0 for s in result["scores"].values())
    assert all(n > 0 for n in result["n_samples"].values())
    assert result["avg"] == pytest.approx(sum(result["scores"].values()) / len(tasks))


# -- dtype: write what you read (merge.dtype / eval.dtype auto) ------------------------------------


def test_a_bf16_familys_merges_are_bf16_on_disk_by_default(
    families: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Default merge settings on a bfloat16 family: every merged tensor is BF16, the merged
    weights take the parents' bytes (not twice them), and the merge id is that of an explicit
    bfloat16 merge (the effective dtype is in the id, not the word `auto`)."""
    from tasks.core.weights import effective_dtype, model_bytes, stored_dtype
    from tasks.merge import merge_identity, merge_models

    built = families["qwen2"]
    parents = built["variants"]
    for method in ("slerp", "task_arithmetic"):
        out = merge_models(parents, tmp_path / method, method, base=built["base"])
        dtypes = {h["dtype"] for h in _headers(out).values()}
        assert dtypes == {"BF16"}, (method, dtypes)
        assert stored_dtype(out) == "bfloat16"
        assert model_bytes(out) <= 1.05 * model_bytes(parents[0])  # headers and shards differ
    resolved = effective_dtype("auto", parents)
    ids = {
        merge_identity(["a", "b"], "slerp", None, base_fingerprint="z", dtype=d, seed=0)
        for d in (resolved, "bfloat16")
    }
    assert resolved == "bfloat16" and len(ids) == 1
    with pytest.raises(ValueError, match="resolve dtype 'auto'"):
        merge_identity(["a", "b"], "slerp", None, base_fingerprint="z", dtype="auto", seed=0)
    # float32 only when asked
    out = merge_models(parents, tmp_path / "f32", "slerp", dtype="float32")
    assert {h["dtype"] for h in _headers(out).values()} == {"F32"}
    # parents stored in different dtypes merge in float32, which holds both exactly
    assert effective_dtype("auto", [parents[0], out]) == "float32"


def test_evaluation_loads_in_the_stored_dtype_by_default(
    families: dict[str, dict[str, Any]],
) -> None:
    import torch

    from tasks.evaluate import evaluation_key, load_model

    path = families["llama"]["base"]
    model, _ = load_model(path, "cpu", "auto")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    settings = {"tasks": [{"task": "t"}], "dtype": "auto", "batch_size": 8}
    explicit = {**settings, "dtype": "bfloat16"}
    # auto on a bf16 model is the bf16 evaluation (one cache entry), not the float32 one
    assert evaluation_key("fp", settings, path) == evaluation_key("fp", explicit, path)
    assert evaluation_key("fp", settings, path) != evaluation_key(
        "fp", {**settings, "dtype": "float32"}, path
    )
