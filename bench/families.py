"""Random checkpoints of real model families, built offline (shared by the tests and benches).

    make_family(root, "qwen2") -> {"base": Path, "variants": [Path, Path], ...}
    make_family(root, "llama", n_variants=3, shape=SCALE_SHAPES["1B"])   # bench/scale.py

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
Everything is saved in bfloat16, sharded (+ model.safetensors.index.json when there are several
shards), with a byte-level BPE tokenizer trained here on zoo-like text (tasks/zoo/build.py CHARS)
and a chat template, so the models can be scored with lm-eval on the zoo's local tasks.
Deterministic from the seed. `shape` sets the geometry: TINY (the tests' ~260 KB models, >= 2
shards) by default, or a Llama-like size of SCALE_SHAPES, whose embedding has 32000 rows as
Llama's, more than the tokenizer's ~384 tokens (padded vocabularies are common on the hub).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks.zoo.build import CHARS

FAMILIES = ("llama", "llama_tied", "mistral", "qwen2", "gemma", "phi3")
TIED = frozenset({"llama_tied", "qwen2", "gemma"})
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
VOCAB_SIZE = 384  # the tokenizer's: 3 specials + 256 byte symbols + ~125 merges


@dataclass(frozen=True)
class Shape:
    """A model's geometry; `vocab` None = the tokenizer's size."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int = 128
    vocab: int | None = None
    shard: str = "64KB"  # save_pretrained's max_shard_size (a tensor never splits)

    def n_params(self, tied: bool = False) -> int:
        """Parameters of the Llama layout (no biases, fused or not), a tied matrix once."""
        vocab = self.vocab or VOCAB_SIZE
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * layer + (1 if tied else 2) * vocab * self.hidden + self.hidden


# ~260 KB per untied model in bf16: 64 KB shards give 3-5 shards
TINY = Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)


def _llama(hidden: int, intermediate: int, layers: int) -> Shape:
    """Llama-2's proportions: 64-wide heads, full multi-head attention, 32000 rows of vocabulary,
    shards of at most 1 GB (hub checkpoints use 2-10 GB: a 1B model still gets several)."""
    heads = hidden // 64
    return Shape(hidden, intermediate, layers, heads, heads, 2048, 32000, "1GB")


SCALE_SHAPES = {  # label -> shape; the label is the parameter count, rounded
    "30M": _llama(384, 1024, 6),
    "60M": _llama(512, 1376, 8),
    "250M": _llama(1024, 2816, 14),
    "1B": _llama(2048, 5632, 18),
    "7B": _llama(4096, 11008, 32),  # Llama-2-7B's shape: for reference, not built by the bench
}
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


def make_tokenizer(
    seed: int = 0, vocab_size: int = VOCAB_SIZE, max_length: int = TINY.max_positions
) -> Any:
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
        model_max_length=max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# -- models --------------------------------------------------------------------------------------


def make_config(family: str, tokenizer: Any, shape: Shape = TINY) -> Any:
    """The transformers config of a `family` model of `shape` (its vocabulary at least
    `tokenizer`'s)."""
    import transformers as tf

    common = {
        "vocab_size": max(len(tokenizer), shape.vocab or 0),
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": shape.max_positions,
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
        return tf.GemmaConfig(**common, head_dim=shape.hidden // shape.heads)
    if family == "phi3":
        # Phi3Config's default pad id (32000) is out of this vocab: `common` overrides it
        return tf.Phi3Config(**common, original_max_position_embeddings=shape.max_positions)
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


def _save(model: Any, tokenizer: Any, folder: Path, shard: str) -> Path:
    """Save in bf16; the model is left in bf16 (the caller restores what it needs)."""
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)
    return folder


def make_family(
    root: Path, family: str, *, n_variants: int = 2, seed: int = 0, shape: Shape = TINY
) -> dict[str, Any]:
    """Build a base and `n_variants` variants of `family` under `root/family`.

    Returns {"family", "tied", "base": Path, "variants": [Path, ...], "models": [base, *variants]}.
    One float32 model and one copy of the base's state are held while building (~8 bytes a
    parameter, ~9 GB for 1B).
    """
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}'; choose from {', '.join(FAMILIES)}")
    out = Path(root) / family
    tokenizer = make_tokenizer(seed, max_length=shape.max_positions)
    config = make_config(family, tokenizer, shape)
    # same seed, different family -> different weights (llama and mistral share a layout)
    model_seed = seed * 7919 + zlib.crc32(family.encode())
    torch.manual_seed(model_seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {"base": _save(model, tokenizer, out / "base", shape.shard), "variants": []}
    for i in range(n_variants):
        # one model object throughout: each variant starts from the base's float32 state
        model.to(torch.float32).load_state_dict(base_state)
        _perturb(model, model_seed, i)
        paths["variants"].append(_save(model, tokenizer, out / f"ft{i + 1}", shape.shard))
    return {
        "family": family,
        "tied": family in TIED,
        **paths,
        "models": [paths["base"], *paths["variants"]],
    }
