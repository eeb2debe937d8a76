"""Golden loss curve: a fixed-seed CPU fp32 SSA run reproduces, bit for bit, the per-iteration losses
recorded before the training code was restructured.

The data is built here from a seeded generator (not the demo corpus, which reads installed
packages' docstrings): synthetic text, a sentencepiece tokenizer trained on it (checked to be
byte-identical when trained twice), MDS shards through the project's prepare code. Any change to
training numerics (mode draws, loss scaling, data order, optimizer) changes these bits; a change
that is meant to do so must record a new curve and say why.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.distributed import run_distributed
from tests.run_helpers import CPU_FP32, NO_OUTPUT_RUN, TINY_MODEL, TINY_SCHEDULE, flags

ITERS = 8

# (ce_loss, align_loss, lr) per iteration as float.hex, recorded from the code before the
# training orchestration was restructured.
GOLDEN: list[tuple[str, str, str]] = [
    ("0x1.8fe4164e113c5p+2", "0x1.1e661a0000000p-11", "0x1.47ae147ae147bp-9"),
    ("0x1.8b44516e70fc7p+2", "0x1.0d63f00000000p-11", "0x1.47ae147ae147bp-8"),
    ("0x1.7b300d2e21752p+2", "0x1.9356500000000p-11", "0x1.33ecb5558eb14p-8"),
    ("0x1.7024471c71c72p+2", "0x1.3d4bb20000000p-11", "0x1.fbe76c8b43959p-9"),
    ("0x1.68261f6e01039p+2", "0x1.e26fdc0000000p-11", "0x1.6872b020c49bbp-9"),
    ("0x1.63ab8d34d34d3p+2", "0x1.fe7bd00000000p-11", "0x1.a9fbe76c8b43cp-10"),
    ("0x1.5eac586186186p+2", "0x1.5b05140000000p-11", "0x1.a42fd659af53fp-11"),
    ("0x1.5f97b2f250185p+2", "0x1.8b1dcc0000000p-11", "0x1.0624dd2f1a9fcp-11"),
]

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pu", "da", "fe", "go", "hi", "ju", "wa"]


def synthetic_documents(seed: int = 7, count: int = 600) -> list[str]:
    """Sentences of made-up words with a first-order word chain, so a model can learn something."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(400)})
    follow = {w: rng.sample(words, 4) for w in words}
    docs = []
    for _ in range(count):
        word = rng.choice(words)
        sentence = [word]
        for _ in range(rng.randint(20, 80)):
            word = rng.choice(follow[word]) if rng.random() < 0.8 else rng.choice(words)
            sentence.append(word)
        docs.append(" ".join(sentence).capitalize() + ".")
    return docs


def build_dataset(root: Path) -> Path:
    from ssa_megatron.data.prepare import prepare_dataset
    from ssa_megatron.data.tokenizer import train_sentencepiece

    docs = synthetic_documents()
    models = []
    for attempt in ("a", "b"):
        models.append(train_sentencepiece(docs, root / f"tok_{attempt}", vocab_size=512, seed=1234))
    first, second = (m.read_bytes() for m in models)
    assert first == second, "sentencepiece training is not deterministic; the golden curve cannot hold"
    tokenizer = root / "data" / "tokenizer.model"
    tokenizer.parent.mkdir(parents=True)
    tokenizer.write_bytes(first)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_dataset(
        [str(corpus)], root / "data", tokenizer, 128, valid_fraction=0.05, seed=1234, workers=1,
        progress=False,
    )  # fmt: skip
    return root / "data"


def overrides(data_dir: str) -> list[str]:
    pairs = {
        "data.path": data_dir,
        "data.tokenizer": data_dir + "/tokenizer.model",
        "data.seq_length": "128",
        **TINY_MODEL,
        "model.attention_mode": "ssa",
        **CPU_FP32,
        **TINY_SCHEDULE,
        "train.train_iters": str(ITERS),
        "eval.at_end": "false",
        **NO_OUTPUT_RUN,
    }
    return flags(pairs)


def _curve(rank: int, world: int, data_dir: str) -> list[tuple[str, str, str]]:
    import io

    import torch

    from ssa_megatron.training import load_config, parse_override_args, run

    # A spawned process of its own: megatron's parallel state dies with it.
    torch.set_num_threads(1)
    cfg = load_config(None, parse_override_args(overrides(data_dir)))
    result = run(cfg, stream=io.StringIO())
    return [(float.hex(h["ce_loss"]), float.hex(h["align_loss"]), float.hex(h["lr"])) for h in result.history]


def test_golden_loss_curve(tmp_path: Path) -> None:
    data = build_dataset(tmp_path)
    (curve,) = run_distributed(_curve, world_size=1, args=(str(data),))
    assert len(curve) == ITERS
    assert curve == GOLDEN, "\n".join(map(str, curve))
