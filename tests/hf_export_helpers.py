"""Shared by the HF export tests: a tiny trained tokenizer, a model that ends generation at EOS, and a clean
site directory holding only torch, transformers, safetensors and tokenizers (with their own dependencies)."""

from __future__ import annotations

import random
import re
from importlib import metadata
from pathlib import Path

import torch
from packaging.requirements import Requirement

from ssa_megatron.convert.presets import tiny_config
from ssa_megatron.data.tokenizer import EOS_ID, train_sentencepiece
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
from tests.test_data_common import random_documents

CLEAN_ROOTS = ("torch", "transformers", "safetensors", "tokenizers")
TOKENIZER_VOCAB = 400
MODEL_VOCAB = 512  # the tokenizer's vocabulary padded, as training pads it
PROMPT = 20  # longer than block_size x block_count (12): sparse and full mode differ
NEW_TOKENS = 40


def train_tokenizer(root: Path, model_type: str = "bpe") -> Path:
    docs = random_documents(random.Random(7), 300)
    prefix = root / f"tok_{model_type}"
    return train_sentencepiece(docs, prefix, vocab_size=TOKENIZER_VOCAB, model_type=model_type)


def _greedy(model: SSAForCausalLM, ids: torch.Tensor, mode: str) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, attention_mode=mode, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def eos_model(prompt: torch.Tensor) -> SSAForCausalLM:
    """A tiny random model whose greedy continuation of ``prompt`` reaches EOS after a few tokens in both
    attention modes.

    A token ``t`` that both modes' continuations produce (from the third step on, never before) has its
    input embedding and output row swapped with EOS's: that relabels ``t`` <-> EOS in input and output
    alike, so the model computes the same function up to the relabelling and now emits EOS where it
    emitted ``t`` first.
    """
    for seed in range(50):
        torch.manual_seed(seed)
        model = SSAForCausalLM(
            tiny_config(vocab_size=MODEL_VOCAB, tie_word_embeddings=False, max_position_embeddings=128)
        ).eval()
        runs = {mode: _greedy(model, prompt, mode) for mode in ("sparse", "full")}
        if runs["sparse"] == runs["full"] or any(EOS_ID in r or EOS_ID in prompt for r in runs.values()):
            continue
        firsts = {mode: {t: r.index(t) for t in set(r)} for mode, r in runs.items()}
        both = [t for t in firsts["sparse"] if t in firsts["full"] and t not in prompt.tolist()[0]]
        both = [t for t in both if min(firsts["sparse"][t], firsts["full"][t]) >= 2]
        if not both:
            continue
        t = min(both)
        with torch.no_grad():
            for rows in (model.model.embed_tokens.weight, model.lm_head.weight):
                rows[[t, EOS_ID]] = rows[[EOS_ID, t]].clone()
        return model
    raise AssertionError("no seed gave a continuation to end at EOS")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def clean_site(dest: Path, roots: tuple[str, ...] = CLEAN_ROOTS) -> Path:
    """Symlink into ``dest`` the installed files of ``roots`` and everything they require (no extras), as
    this interpreter finds them (so a transformers 5 overlay on PYTHONPATH wins). Run a child with
    ``python -I -S`` and ``dest`` as its only site directory to get an environment holding exactly these."""
    dest.mkdir(parents=True, exist_ok=True)
    found: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = _canonical(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform dependency not installed here
        found[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    for dist in found.values():
        tops = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "__pycache__")}
        for top in sorted(tops):
            src = Path(str(dist.locate_file(top)))
            if src.exists() and not (dest / top).exists():
                (dest / top).symlink_to(src)
    return dest
