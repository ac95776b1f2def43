"""Loading a model for a step: straight onto its device, one from_pretrained at a time.

Light on purpose (torch and transformers only): the CUDA load check (bench/cuda_load.py) runs it
on a machine without the rest of the stack.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tasks.core.weights import effective_dtype

# transformers 5.23's from_pretrained is not thread-safe: it swaps process-wide globals for the
# duration of a load (PreTrainedModel.tie_weights -> no-op, torch's default dtype, torch.linspace)
# and restores what it saw on entry, so two interleaved loads can leave tie_weights a no-op for
# good. A tied-embedding model (no lm_head tensor: Qwen2, Gemma, Llama-3.2) then keeps its
# lm_head on the meta device and `.to(device)` raises "Cannot copy out of meta tensor". Measured
# here (bench/concurrent_load.py, 3 threads): tied loads failed in 44/50 tries with plain
# transformers and 10/10 through this function unlocked; untied loads never raised but left the
# process patched in 40/50 tries, and every later tied load, even a sequential one, then failed.
# In a fresh process the threads also race transformers' lazy import (ImportError: cannot import
# name 'AutoModelForCausalLM', 5/5 tries). So the imports and from_pretrained itself run one at a
# time; the tokenizer (no such globals) loads outside the lock. This only orders the loads made
# here: a from_pretrained elsewhere in the process can still interleave.
_LOAD_LOCK = threading.Lock()


def load_model(model_dir: Path, device: str, dtype: str) -> tuple[Any, Any]:
    """The model and its tokenizer from `model_dir`, on `device`, in eval mode; safe across threads.

    The weights go straight to `device` (a device map: transformers builds the model on the meta
    device and places each tensor as it reads it), so a GPU evaluation never holds a CPU copy of
    the model. `dtype` `auto`: the model's stored dtype (tasks.core.weights.stored_dtype).
    """
    import torch

    torch_dtype = getattr(torch, effective_dtype(dtype, [model_dir]))
    with _LOAD_LOCK:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch_dtype, device_map=device
        )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model.eval(), tokenizer
