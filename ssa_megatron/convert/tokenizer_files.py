"""The tokenizer files of an exported model: what ``AutoTokenizer.from_pretrained(dir)`` needs, no more.

An exported directory must load where only torch, transformers, safetensors and tokenizers are installed.
A sentencepiece ``tokenizer.model`` alone does not: transformers then needs sentencepiece and protobuf
(and on 5.x reports a misleading "tiktoken is required"). So a sentencepiece model is converted here
into a ``tokenizer.json`` for the ``tokenizers`` library, with the semantics of sentencepiece's own
encoder (dummy prefix, whitespace as "▁", byte fallback; BPE merges ranked by piece score, or the
unigram scores), and the directory gets ``tokenizer_config.json`` and ``special_tokens_map.json``
naming BOS/EOS/PAD/UNK. ``tokenizer.model`` is kept beside it for sentencepiece users.

Reading the sentencepiece model needs sentencepiece and protobuf, which the project installs; the
exported files do not.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# sentencepiece ModelProto piece types and model types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
_SPACE = "\u2581"


class TokenizerExportError(ValueError):
    """A tokenizer that cannot be exported as-is; the message names the file and the reason."""


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of an exported tokenizer (token text and id; None where the tokenizer has none)."""

    eos: tuple[str, int]
    bos: tuple[str, int] | None = None
    pad: tuple[str, int] | None = None
    unk: tuple[str, int] | None = None

    def ids(self) -> dict[str, int | None]:
        """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` as config.json and generation_config.json
        hold them (PAD falls back to EOS, as the training data pads)."""
        pad = self.pad or self.eos
        return {
            "bos_token_id": self.bos[1] if self.bos else None,
            "eos_token_id": self.eos[1],
            "pad_token_id": pad[1],
        }


def _load_proto(model_path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_path.read_bytes())
    except Exception as err:  # protobuf's DecodeError, or a truncated file
        raise TokenizerExportError(
            f"tokenizer {model_path} is not a readable sentencepiece model ({type(err).__name__}); pass the "
            ".model file written by tools/train_tokenizer.py"
        ) from err
    if not proto.pieces:
        raise TokenizerExportError(f"tokenizer {model_path} holds no pieces; it is not a sentencepiece model")
    return proto


def _bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every (left, right) pair whose concatenation is a piece, in sentencepiece's merge priority: the
    merged piece's score (higher first), then the ids of the parts."""
    ranked = []
    for piece in vocab:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[piece], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_to_tokenizer(model_path: str | Path) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes and decodes exactly as the sentencepiece model does
    (without adding BOS/EOS: the training data carries no BOS and ends documents with EOS)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    path = Path(model_path)
    proto = _load_proto(path)
    norm = proto.normalizer_spec
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces:
        raise TokenizerExportError(
            f"tokenizer {path}: normalization rule {norm.name!r} (remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}) cannot be converted exactly; train the tokenizer with "
            "tools/train_tokenizer.py (identity normalization) or pass a tokenizer.json"
        )
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    unk_id = next((i for i, (_, _, kind) in enumerate(pieces) if kind == _UNKNOWN), None)
    model_type = proto.trainer_spec.model_type
    if model_type == _BPE:
        scores = {piece: score for piece, score, _ in pieces}
        model = models.BPE(
            vocab=vocab,
            merges=_bpe_merges(vocab, scores),
            unk_token=pieces[unk_id][0] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    elif model_type == _UNIGRAM:
        model = models.Unigram([(piece, score) for piece, score, _ in pieces], unk_id, byte_fallback)
    else:
        raise TokenizerExportError(
            f"tokenizer {path}: sentencepiece model type {model_type} is neither BPE nor unigram; it "
            "cannot be converted"
        )
    tok = Tokenizer(model)
    steps = [normalizers.Prepend(_SPACE)] if norm.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPACE)])
    undo = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        undo.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(undo)
    # Control pieces (<s>, </s>, <pad>) and <unk> are special; user-defined symbols are matched in text as
    # sentencepiece matches them.
    tok.add_tokens(
        [
            AddedToken(piece, special=kind in (_CONTROL, _UNKNOWN), normalized=False)
            for piece, _, kind in pieces
            if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED)
        ]
    )
    return tok


def _special_tokens(src: Path) -> SpecialTokens:
    if src.suffix == ".model":
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(src))
        except (OSError, RuntimeError) as err:
            raise TokenizerExportError(
                f"tokenizer {src} is not a readable sentencepiece model: {err}"
            ) from err

        def piece(token_id: int) -> tuple[str, int] | None:
            return (sp.id_to_piece(token_id), token_id) if token_id >= 0 else None

        eos = piece(sp.eos_id())
        if eos is None:
            raise TokenizerExportError(f"tokenizer {src} has no EOS piece; retrain it with an eos id")
        return SpecialTokens(eos=eos, bos=piece(sp.bos_id()), pad=piece(sp.pad_id()), unk=piece(sp.unk_id()))

    from tokenizers import Tokenizer

    from ssa_megatron.data.tokenizer import HFTokenizer

    try:
        wrapped, raw = HFTokenizer(src), Tokenizer.from_file(str(src))
    except Exception as err:  # the tokenizers library raises plain Exception for unparsable files
        raise TokenizerExportError(f"tokenizer {src} cannot be read: {err}") from err

    def token(token_id: int | None) -> tuple[str, int] | None:
        return None if token_id is None else (raw.id_to_token(token_id), token_id)

    eos = token(wrapped.eos_id)
    assert eos is not None
    return SpecialTokens(eos=eos, bos=token(wrapped.bos_id), pad=token(wrapped.pad_id))


def tokenizer_vocab_size(tokenizer_path: str | Path) -> int:
    """How many ids the tokenizer produces (added tokens included)."""
    from ssa_megatron.data.tokenizer import load_tokenizer

    try:
        return int(load_tokenizer(_source_file(Path(tokenizer_path))).vocab_size)
    except TokenizerExportError:
        raise
    except Exception as err:  # sentencepiece / tokenizers errors for damaged files
        raise TokenizerExportError(f"tokenizer {tokenizer_path} cannot be read: {err}") from err


def _source_file(src: Path) -> Path:
    """The tokenizer file behind ``src``: itself, or a directory's tokenizer.json / tokenizer.model."""
    if src.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (src / name).is_file():
                return src / name
        raise TokenizerExportError(
            f"tokenizer directory {src} holds no tokenizer.json (HF tokenizers) or tokenizer.model "
            "(sentencepiece)"
        )
    if not src.is_file():
        raise TokenizerExportError(
            f"tokenizer {src} does not exist; pass a sentencepiece .model file, a tokenizer.json, or a "
            "directory holding one"
        )
    if src.suffix not in (".json", ".model"):
        raise TokenizerExportError(
            f"tokenizer {src} is neither a tokenizer.json nor a sentencepiece .model file"
        )
    return src


def write_tokenizer_files(
    tokenizer_path: str | Path, out_dir: str | Path, *, model_max_length: int | None = None
) -> SpecialTokens:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (plus the
    sentencepiece ``tokenizer.model`` when that is the source) into ``out_dir``; returns the specials."""
    src = _source_file(Path(tokenizer_path))
    out = Path(out_dir)
    specials = _special_tokens(src)
    if src.suffix == ".model":
        sentencepiece_to_tokenizer(src).save(str(out / "tokenizer.json"))
        shutil.copyfile(src, out / "tokenizer.model")
    else:
        shutil.copyfile(src, out / "tokenizer.json")
    tokens = {
        "bos_token": specials.bos[0] if specials.bos else None,
        "eos_token": specials.eos[0],
        "pad_token": (specials.pad or specials.eos)[0],
        "unk_token": specials.unk[0] if specials.unk else None,
    }
    tokens = {k: v for k, v in tokens.items() if v is not None}
    config: dict[str, Any] = {
        # The fast class needs only `tokenizers`; never a slow class that would pull in sentencepiece.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n", encoding="utf-8")
    return specials
