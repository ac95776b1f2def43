"""The zoo's tokenizer, models and training, and its fine-tunes run in parallel processes.

Kept apart from build.py (which imports Prefect) so that a spawned fine-tune worker imports only
torch and transformers.

Why the parallel build gives the same bytes as the sequential one: every fine-tune starts from the
saved base weights, its training texts are drawn beforehand in the parent from the one seeded
stream in the same order as a sequential build draws them, and it runs with the configured torch
thread count and deterministic kernels. What a fine-tune computes then depends on nothing another
fine-tune does, so which process runs it, and when, does not change its bytes.
"""

from __future__ import annotations

import multiprocessing
import os
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tasks.core.errors import InputError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = string.digits + string.ascii_lowercase + " +="
WEIGHTS_FILE = "model.safetensors"


def build_tokenizer(max_length: int) -> Any:
    """A character-level fast tokenizer in Hugging Face format.

    No BOS is added on encode: lm-eval encodes with the tokenizer's defaults, and training
    must see the same token sequences it scores.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def _encode_batch(texts: Sequence[str], vocab: Mapping[str, int], max_len: int) -> torch.Tensor:
    """Char ids + EOS, right-padded to the longest text (not max_len: ~2x faster here)."""
    rows = [([vocab[c] for c in text][: max_len - 1] + [vocab["<eos>"]]) for text in texts]
    ids = torch.full((len(rows), max(map(len, rows))), vocab["<pad>"], dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def train(
    model: Any,
    batches: Iterable[Sequence[str]],
    opt: Mapping[str, Any],
    vocab: Mapping[str, int],
    desc: str,
    progress: bool,
) -> float:
    """Next-token training on `opt["steps"]` batches of text; returns the mean loss of the last
    tenth of steps.

    `opt`: steps, lr, batch_size, warmup_steps, min_lr_ratio (linear decay floor),
    weight_decay, grad_clip.
    """
    steps = opt["steps"]
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt["lr"], weight_decay=opt["weight_decay"]
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / max(1, opt["warmup_steps"]))
            * max(opt["min_lr_ratio"], 1 - s / steps)
        ),
    )
    max_len = model.config.max_position_embeddings
    losses: list[float] = []
    for texts in tqdm(batches, total=steps, desc=desc, disable=not progress, leave=False):
        ids = _encode_batch(texts, vocab, max_len)
        mask = ids != vocab["<pad>"]
        loss = model(
            input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100)
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt["grad_clip"])
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    if len(losses) != steps:
        raise ValueError(f"{desc}: got {len(losses)} batches for {steps} steps")
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail)


def new_model(model_cfg: Mapping[str, Any], tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg["hidden_size"],
        intermediate_size=model_cfg["intermediate_size"],
        num_hidden_layers=model_cfg["num_hidden_layers"],
        num_attention_heads=model_cfg["num_attention_heads"],
        num_key_value_heads=model_cfg["num_attention_heads"],
        max_position_embeddings=model_cfg["max_position_embeddings"],
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def save(model: Any, tokenizer: Any, folder: Path) -> None:
    # transformers 5 always writes safetensors (its save_pretrained lost safe_serialization)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the build, restored afterwards.

    CPU float reductions depend on how work is split across threads, so bit-identical
    rebuilds need the same thread count as well as the same seed.
    """
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


# -- fine-tunes, in this process or in parallel ----------------------------------------------------


@dataclass(frozen=True)
class FineTune:
    """One fine-tune: everything it needs, picklable for a spawned worker."""

    skill: str
    out: Path  # the zoo folder being built: reads out/base, writes out/<skill>
    batches: list[list[str]]  # the training texts, drawn by the parent in sequential order
    model: dict[str, Any]
    opt: dict[str, Any]
    threads: int


def finetune(job: FineTune, progress: bool = False) -> float:
    """Fine-tune the saved base on `job.batches`, save it to out/<skill>; the final loss."""
    from safetensors.torch import load_file

    with deterministic(job.threads):
        tokenizer = build_tokenizer(job.model["max_position_embeddings"])
        model = new_model(job.model, tokenizer)
        model.load_state_dict(load_file(job.out / "base" / WEIGHTS_FILE))
        loss = train(
            model, job.batches, job.opt, tokenizer.get_vocab(), f"fine-tune {job.skill}", progress
        )
        save(model, tokenizer, job.out / job.skill)
    return loss


def resolve_workers(workers: int | str, threads: int, n_jobs: int) -> int:
    """`auto`: one process per `threads` of the CPUs this process may use, at most one per job."""
    if workers == "auto":
        workers = max(1, len(os.sched_getaffinity(0)) // threads)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise InputError(f"zoo.workers: a positive integer or 'auto', got {workers!r}")
    if multiprocessing.current_process().daemon:
        return 1  # a daemonic process (a Dask worker, a pool's worker) may not start children
    return min(workers, n_jobs)


def run_finetunes(jobs: Sequence[FineTune], workers: int, progress: bool) -> dict[str, float]:
    """Every job's final loss by skill: in this process when `workers` is 1, else in `workers`
    spawned processes (spawn, not fork: the parent's torch thread pool and any Prefect or Hydra
    state must not be copied into the children)."""
    if workers == 1:
        return {job.skill: finetune(job, progress) for job in jobs}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(finetune, job): job.skill for job in jobs}
        done = tqdm(
            as_completed(futures),
            total=len(jobs),
            desc=f"fine-tunes ({workers} processes)",
            disable=not progress,
            leave=False,
        )
        losses = {futures[f]: f.result() for f in done}
    return {job.skill: losses[job.skill] for job in jobs}
