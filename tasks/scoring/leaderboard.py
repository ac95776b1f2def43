"""The Open LLM Leaderboard v2's normalisation of raw scores (eval=open_llm_v2), computed here
from lm-eval's per-task results: lm-eval reports raw values only.

As the leaderboard documented it (huggingface.co/docs/leaderboards/open_llm_leaderboard/
normalization): a score is rescaled from its random baseline 1/k (k answer choices) to 1,
(raw - 1/k) / (1 - 1/k), and set to 0 below the baseline; a benchmark with subtasks of different
k (BBH, MuSR) rescales each subtask by its own k and takes their plain mean; a generative task
(MATH, IFEval) has baseline 0, so its score is unchanged. An eval.tasks entry says which with
`choices` (see `check_choices`); its score is the mean of its metrics (IFEval: prompt- and
instruction-level strict accuracy, as the leaderboard showed it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tasks.core.errors import InputError

GENERATIVE = 0  # `choices: 0`: no random baseline (generated answers), the score as it is


def rescale(raw: float, choices: int) -> float:
    """`raw` rescaled from the random baseline of `choices` answers (0 at chance or below, 1 at
    a perfect score); `choices` 0 (generative): `raw`, floored at 0."""
    if choices == GENERATIVE:
        return max(raw, 0.0)
    chance = 1.0 / choices
    return max((raw - chance) / (1.0 - chance), 0.0)


def metric_mean(values: Mapping[str, Any], keys: Sequence[str]) -> float:
    """The mean of `keys` (lm-eval's `metric,filter`) in one task's reported values."""
    return sum(float(values[k]) for k in keys) / len(keys)


def entry_scores(
    name: str,
    keys: Sequence[str],
    choices: int | Mapping[str, int] | None,
    reported: Mapping[str, Mapping[str, Any]],
) -> tuple[float, float]:
    """(score, raw) of eval.tasks entry `name` from lm-eval's reported values (task or group ->
    `metric,filter` -> value): raw is the mean of its metrics `keys` as lm-eval reports them for
    `name` (a group's aggregate for a group); score is raw rescaled by `choices`: None, as it is;
    an int k, from 1/k; a mapping subtask -> k, each subtask's raw rescaled by its own k, then
    their plain mean (the leaderboard's BBH and MuSR, not lm-eval's size-weighted aggregate)."""
    raw = metric_mean(reported[name], keys)
    if choices is None:
        return raw, raw
    if isinstance(choices, Mapping):
        parts = [rescale(metric_mean(reported[sub], keys), k) for sub, k in choices.items()]
        return sum(parts) / len(parts), raw
    return rescale(raw, choices), raw


def check_choices(key: str, choices: Any) -> int | dict[str, int] | None:
    """An entry's `choices`: null (no rescaling), 0 (generative: baseline 0), a number of answer
    choices k >= 2, or a mapping subtask -> k >= 2 (or 0); else InputError."""

    def one(where: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value == 1 or value < 0:
            raise InputError(
                f"{where}: a number of answer choices (2 or more), or 0 for a generative task, "
                f"got {value!r}"
            )
        return value

    if choices is None:
        return None
    if isinstance(choices, Mapping):
        if not choices:
            raise InputError(f"{key}: a mapping of subtask -> number of choices, got none")
        return {str(sub): one(f"{key}.{sub}", k) for sub, k in choices.items()}
    return one(key, choices)
