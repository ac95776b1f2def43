"""CPU memory of a model load onto CUDA: tasks.core.load.load_model (device map) against the
old path (from_pretrained on CPU, then .to(device)). Needs a CUDA machine; prints figures.

    python bench/cuda_load.py [--params 600e6] [--dir /tmp/cuda-load]

A random Llama-shaped bf16 model (about `--params` parameters) is built once on the GPU and
saved; each load then runs in a fresh process that starts CUDA first, records its RSS, loads,
runs one forward pass, and reports the peak RSS above that baseline (sampled every 5 ms, and
the kernel's high-water mark reset before the load) ÷ the model's bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path, params: float) -> Path:
    """A random bf16 Llama of about `params` parameters in `folder` (skipped if present)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    hidden, inter = 2048, 5632
    layers = max(1, round((params - 2 * 32000 * hidden) / (4 * hidden**2 + 3 * hidden * inter)))
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    # load_model reads a tokenizer too: a byte-level BPE trained on a few words does
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel()
    core.train_from_iterator(["add 12+7=19", "rev abc=cba"], trainers.BpeTrainer(vocab_size=300))
    PreTrainedTokenizerFast(tokenizer_object=core).save_pretrained(folder)
    return folder


def _rss() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kb = {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon") if k in fields}
    return kb.get("VmRSS", 0), kb.get("RssAnon", 0)


def measure(folder: Path, path: str) -> dict[str, float]:
    """Load `folder` onto cuda by `path` ("device_map" or "to_device") in this process."""
    import torch

    from tasks.core.weights import model_bytes

    torch.zeros(1, device="cuda")  # CUDA's own CPU memory is in the baseline
    from transformers import AutoModelForCausalLM  # noqa: F401 - imports in the baseline too

    from tasks.core.load import load_model

    base_rss, base_anon = _rss()
    peak = [base_rss, base_anon]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, anon = _rss()
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    torch.cuda.reset_peak_memory_stats()
    sampler.start()
    start = time.perf_counter()
    if path == "device_map":
        model, _ = load_model(folder, "cuda", "auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
        model.to("cuda").eval()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        model(torch.randint(0, 32000, (4, 128), device="cuda"))
    torch.cuda.synchronize()
    done.set()
    sampler.join()
    after_rss, _ = _rss()
    size = model_bytes(folder)
    return {
        "path": path,
        "model_gb": size / 1e9,
        "load_s": round(seconds, 2),
        "peak_rss_over_model": round((peak[0] - base_rss) / size, 3),
        "peak_anon_over_model": round((peak[1] - base_anon) / size, 3),
        "after_rss_over_model": round((after_rss - base_rss) / size, 3),
        "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=600e6)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cuda-load"))
    parser.add_argument("--measure", choices=("device_map", "to_device"))
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dir, args.measure)))
        return
    build(args.dir, args.params)
    for path in ("device_map", "to_device"):
        out = subprocess.run(
            [sys.executable, __file__, "--dir", str(args.dir), "--measure", path],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr[-2000:])


if __name__ == "__main__":
    main()
