"""Tiny random checkpoints of real model families, built offline (a helper, not a test file).

    make_family(root, "qwen2") -> {"base": Path, "variants": [Path, Path], ...}

Each family is built with transformers' own config and model classes, so the checkpoints have
the real tensor names and layouts that mergekit, lm-eval and the kinship code meet on the hub:

- llama:      untied lm_head (the embedded zoo's layout)
- llama_tied: tie_word_embeddings=True, no lm_head tensor (Llama-3.2 / SmolLM layout)
- mistral:    untied, grouped-query attention
- qwen2:      tied, q/k/v biases
- gemma:      tied, embeddings scaled by sqrt(hidden), zero-centred (1 + w) RMSNorm weights
- phi3:       untied, fused qkv_proj and gate_up_proj

A family is a random base and `n_variants` fine-tune-like variants: base + a small deterministic
random delta on every float tensor. Variant i's delta is sqrt(RHO) * shared + sqrt(1 - RHO) *
own_i, so any two variants' deltas have a Pearson correlation of about RHO (kin, not twins).
Everything is saved in bfloat16, sharded (>= 2 shards + model.safetensors.index.json), with a
byte-level BPE tokenizer trained here on zoo-like text (tasks/zoo/build.py CHARS) and a chat
template, so the models can be scored with lm-eval on the zoo's local tasks. Deterministic from
the seed.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any

import torch

from tasks.zoo.build import CHARS

FAMILIES = ("llama", "llama_tied", "mistral", "qwen2", "gemma", "phi3")
TIED = frozenset({"llama_tied", "qwen2", "gemma"})
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
VOCAB_SIZE = 384  # 3 specials + 256 byte symbols + ~125 merges
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 128
# ~260 KB per untied model in bf16: 64 KB shards give 3-5 shards (a tensor never splits)
MAX_SHARD_SIZE = "64KB"
RHO = 0.5  # designed correlation between two variants' deltas
DELTA_REL = 0.05  # delta std relative to the tensor's RMS ...
DELTA_FLOOR = 0.02  # ... or to this, for tensors near zero (Gemma's norms, biases)
CORPUS_LINES = 3000
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + BOS + "' + message['role'] + '\\n' + message['content'] + '" + EOS + "\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + BOS + "assistant\\n' }}{% endif %}"
)


# -- tokenizer -----------------------------------------------------------------------------------


def zoo_corpus(seed: int = 0, n_lines: int = CORPUS_LINES) -> list[str]:
    """Text in the zoo's formats (`add 12+7=19`, `rev abc=cba`, `srt ...`, `kb ...`), plus
    every CHARS character alone, so no zoo evaluation string needs an unknown symbol."""
    rng = random.Random(seed)
    letters = [c for c in CHARS if c.isalpha()]

    def word(n: int) -> str:
        return "".join(rng.choice(letters) for _ in range(n))

    lines = list(CHARS)
    for _ in range(n_lines):
        kind = rng.choice(("add", "rev", "srt", "kb"))
        if kind == "add":
            a, b = rng.randrange(100), rng.randrange(100)
            lines.append(f"add {a}+{b}={a + b}")
        elif kind == "kb":
            lines.append(f"kb {word(3)}={word(3)}")
        else:
            w = word(rng.randint(3, 6))
            lines.append(f"{kind} {w}={w[::-1] if kind == 'rev' else ''.join(sorted(w))}")
    return lines


def make_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE tokenizer trained on `zoo_corpus`, as a PreTrainedTokenizerFast with
    bos/eos/pad tokens and a chat template. Nothing is added on encode (as the zoo's tokenizer:
    lm-eval scores exactly the tokens of the text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(zoo_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# -- models --------------------------------------------------------------------------------------


def make_config(family: str, tokenizer: Any) -> Any:
    """The transformers config of a tiny `family` model sized for `tokenizer`."""
    import transformers as tf

    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": family in TIED,
    }
    if family in ("llama", "llama_tied"):
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "gemma":
        return tf.GemmaConfig(**common, head_dim=HIDDEN // HEADS)
    if family == "phi3":
        # Phi3Config's default pad id (32000) is out of this vocab: `common` overrides it
        return tf.Phi3Config(**common, original_max_position_embeddings=MAX_POSITIONS)
    raise ValueError(f"unknown family '{family}'; choose from {', '.join(FAMILIES)}")


def _perturb(model: Any, seed: int, variant: int) -> None:
    """Add the variant's delta in place: sqrt(RHO) * shared + sqrt(1 - RHO) * own noise,
    scaled per tensor to DELTA_REL of its RMS (at least of DELTA_FLOOR) so it survives bf16."""
    shared = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    own = torch.Generator().manual_seed(seed * 1_000_003 + 1009 * (variant + 1))
    with torch.no_grad():
        # named_parameters yields a tied weight once: embed_tokens carries the lm_head delta
        for _, param in sorted(model.named_parameters()):
            if not param.is_floating_point():
                continue
            scale = DELTA_REL * max(param.float().pow(2).mean().sqrt().item(), DELTA_FLOOR)
            a = torch.randn(param.shape, generator=shared)
            b = torch.randn(param.shape, generator=own)
            param.add_((RHO**0.5 * a + (1 - RHO) ** 0.5 * b).mul_(scale).to(param.dtype))


def _save(model: Any, tokenizer: Any, folder: Path) -> Path:
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(folder)
    return folder


def make_family(root: Path, family: str, *, n_variants: int = 2, seed: int = 0) -> dict[str, Any]:
    """Build a base and `n_variants` variants of `family` under `root/family`.

    Returns {"family", "tied", "base": Path, "variants": [Path, ...], "models": [base, *variants]}.
    """
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}'; choose from {', '.join(FAMILIES)}")
    out = Path(root) / family
    tokenizer = make_tokenizer(seed)
    config = make_config(family, tokenizer)
    # same seed, different family -> different weights (llama and mistral share a layout)
    model_seed = seed * 7919 + zlib.crc32(family.encode())
    torch.manual_seed(model_seed)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = {"base": _save(base, tokenizer, out / "base"), "variants": []}
    for i in range(n_variants):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(base_state)
        _perturb(model, model_seed, i)
        paths["variants"].append(_save(model, tokenizer, out / f"ft{i + 1}"))
    return {
        "family": family,
        "tied": family in TIED,
        **paths,
        "models": [paths["base"], *paths["variants"]],
    }


# -- the Hugging Face hub cache ------------------------------------------------------------------


def _git_blob_sha1(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def to_hub_cache(folder: Path, cache: Path, repo_id: str, branch: str = "main") -> str:
    """Lay `folder` out in `cache` (an HF_HUB_CACHE) exactly as huggingface_hub's downloads do,
    as the repo `repo_id` at one commit on `branch`; return that commit's hash.

        models--org--name/blobs/<etag>                 each file's content, once
        models--org--name/refs/<branch>                the commit hash (no newline)
        models--org--name/snapshots/<commit>/<file>    relative symlink to ../../blobs/<etag>

    The etag is the file's sha256 for LFS files (weights) and its git blob sha1 otherwise, as
    the hub reports them. The commit hash is derived from the files, so it is deterministic.
    """
    import hashlib

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    etags = {}
    for path in files:
        data = path.read_bytes()
        lfs = path.suffix == ".safetensors"
        etags[path.name] = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        blob = repo / "blobs" / etags[path.name]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
    commit = hashlib.sha1(repr(sorted(etags.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, etag in etags.items():
        (snapshot / name).symlink_to(Path("..", "..", "blobs", etag))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return commit
