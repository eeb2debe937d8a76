"""Synthetic passkey retrieval: a number hidden at a chosen depth of filler text, asked for at the end.

A trial counts as retrieved when greedy decoding would reproduce every answer token, checked with one
teacher-forced forward pass (argmax at each answer position equals the answer token), which is exactly
what greedy generation of the answer would produce, at a fraction of the cost.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

# Our own neutral filler; repeated until the prompt reaches the requested length.
FILLER = (
    " Rivers run down to the sea while the hills stay where they are."
    " A cart rolls along the road and the miller counts his sacks of flour."
)
NEEDLE = " The secret number is {key}. Remember it: {key} is the secret number."
QUESTION = " What is the secret number? The secret number is"


@dataclass
class PasskeySample:
    ids: torch.Tensor  # [T] prompt followed by the answer
    answer_start: int  # index of the first answer token in ids
    needle_start: int  # token index where the needle begins


def build_passkey_sample(
    encode: Callable[[str], list[int]], length: int, depth: float, key: str
) -> PasskeySample:
    """Exactly ``length`` tokens: filler, the needle at ``depth`` (0 = start, 1 = end) of the filler, the
    question, then the answer ``" " + key``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = encode(NEEDLE.format(key=key))
    question = encode(QUESTION)
    answer = encode(" " + key)
    budget = length - len(needle) - len(question) - len(answer)
    if budget < 0:
        raise ValueError(
            f"length {length} is too short for the passkey prompt ({length - budget} tokens without filler)"
        )
    unit = encode(FILLER)
    filler = (unit * (budget // len(unit) + 1))[:budget]
    at = round(depth * budget)
    ids = filler[:at] + needle + filler[at:] + question + answer
    return PasskeySample(torch.tensor(ids, dtype=torch.int64), length - len(answer), at)


def answer_retrieved(logits: torch.Tensor, ids: torch.Tensor, answer_start: int) -> bool:
    """``logits [T, V]`` of ``ids [T]``: True when every answer token is the argmax one position earlier."""
    predicted = logits[answer_start - 1 : ids.numel() - 1].argmax(dim=-1)
    return bool(torch.equal(predicted, ids[answer_start:].to(predicted.device)))


@torch.no_grad()
def passkey_retrieval(
    model: Any,
    encode: Callable[[str], list[int]],
    *,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    modes: Sequence[str] = ("sparse", "full"),
    trials: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy per (length, depth, mode) over ``trials`` random 5-digit keys (same keys in every cell)."""
    rng = random.Random(seed)
    keys = [str(rng.randrange(10000, 100000)) for _ in range(trials)]
    device = next(model.parameters()).device
    cells = [(n, d, m) for n in lengths for d in depths for m in modes]
    rows = []
    for length, depth, mode in tqdm(cells, desc="passkey", disable=not progress, leave=False):
        hits = 0
        for key in keys:
            sample = build_passkey_sample(encode, length, depth, key)
            logits = model(sample.ids.unsqueeze(0).to(device), use_cache=False, attention_mode=mode).logits[0]
            hits += answer_retrieved(logits, sample.ids, sample.answer_start)
        rows.append({"length": length, "depth": depth, "mode": mode, "accuracy": hits / trials})
    return {"trials": trials, "rows": rows}
