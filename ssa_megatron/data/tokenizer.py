"""Tokenizers: one small interface over a sentencepiece model or a Hugging Face ``tokenizer.json``.

``load_tokenizer(path)`` picks the backend from the file: ``*.json`` is read with the
``tokenizers`` package (so a Llama-3 ``tokenizer.json`` works), anything else is a
sentencepiece model. ``train_sentencepiece`` trains a new model (BPE or unigram, byte
fallback, our fixed special-token ids) deterministically from an iterator of documents.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

# Fixed ids for the models we train, so every config and checkpoint agrees on them.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
UNK_PIECE, BOS_PIECE, EOS_PIECE, PAD_PIECE = "<unk>", "<s>", "</s>", "<pad>"

# Special tokens of common HF tokenizers, tried in order when the caller names none.
_HF_BOS = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "[CLS]")
_HF_EOS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "[SEP]")
_HF_PAD = ("<pad>", "<|finetune_right_pad_id|>", "[PAD]", "<|padding|>")


class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece model; ``encode`` adds no BOS/EOS (the packer decides where they go)."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        import sentencepiece as spm

        self.path = str(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        if self._sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {self.path} has no EOS piece; retrain it with an eos id")

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def bos_id(self) -> int | None:
        value = self._sp.bos_id()
        return None if value < 0 else int(value)

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        # Models without a pad piece pad with EOS; padded positions are masked out of the loss anyway.
        value = self._sp.pad_id()
        return self.eos_id if value < 0 else int(value)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece_to_id(self, piece: str) -> int:
        return int(self._sp.piece_to_id(piece))


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (e.g. Llama 3) through the ``tokenizers`` package."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError as err:  # the package comes with the `hf` extra
            raise ImportError(
                f"reading {path} needs the `tokenizers` package; install ssa-megatron[hf]"
            ) from err
        self.path = str(path)
        self._tok = _HFTok.from_file(self.path)
        self._bos = self._find(bos_token, _HF_BOS, "bos_token", required=False)
        eos = self._find(eos_token, _HF_EOS, "eos_token", required=True)
        assert eos is not None
        self._eos = eos
        pad = self._find(pad_token, _HF_PAD, "pad_token", required=False)
        self._pad = eos if pad is None else pad

    def _find(self, name: str | None, candidates: Sequence[str], what: str, *, required: bool) -> int | None:
        names = (name,) if name is not None else candidates
        for candidate in names:
            token_id = self._tok.token_to_id(candidate)
            if token_id is not None:
                return int(token_id)
        if name is not None:
            raise ValueError(f"{what}={name!r} is not in the vocabulary of {self.path}")
        if required:
            raise ValueError(
                f"could not find an {what} in {self.path} (tried {', '.join(candidates)}); pass {what}=..."
            )
        return None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(enc.ids) for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(
    path: str | os.PathLike,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> SentencePieceTokenizer | HFTokenizer:
    """Open a sentencepiece model, or a ``tokenizer.json`` (file or the directory holding it)."""
    p = Path(path)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"tokenizer {str(path)!r} does not exist; pass a sentencepiece .model file or a tokenizer.json "
            "(train one with tools/train_tokenizer.py)"
        )
    if p.suffix == ".json":
        return HFTokenizer(p, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
    if any(x is not None for x in (bos_token, eos_token, pad_token)):
        raise ValueError("bos_token/eos_token/pad_token apply to tokenizer.json only; a sentencepiece model "
                         "carries its own special ids")
    return SentencePieceTokenizer(p)


# The sentencepiece trainer options no caller chooses: the special pieces at their fixed ids, digits
# split, whitespace and text kept as written (identity normalisation) so decoding restores the input.
_TRAINER_FIXED: dict[str, Any] = dict(
    shuffle_input_sentence=True, split_digits=True, allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
    unk_piece=UNK_PIECE, bos_piece=BOS_PIECE, eos_piece=EOS_PIECE, pad_piece=PAD_PIECE,
)


def train_sentencepiece(
    documents: Iterable[str],
    model_prefix: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    user_defined_symbols: Sequence[str] = (),
    character_coverage: float = 0.9995,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 0,
    seed: int = 1234,
    num_threads: int = 1,
    hard_vocab_limit: bool = True,
) -> Path:
    """Train a sentencepiece model on ``documents``; write ``<model_prefix>.model`` and ``.vocab``.

    Ids are fixed: unk=0, bos=1, eos=2, pad=3 (then ``user_defined_symbols``). With the same
    documents, parameters and seed the model file is byte-identical (the training sample
    and the trainer's RNG are both seeded).
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r} is not supported; use 'bpe' or 'unigram'")
    reserved = {UNK_PIECE, BOS_PIECE, EOS_PIECE, PAD_PIECE}
    clash = sorted(reserved.intersection(user_defined_symbols))
    if clash:
        raise ValueError(f"user_defined_symbols {clash} clash with the built-in special pieces; drop them")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    def sentences() -> Iterator[str]:
        # sentencepiece treats each item as one sentence; long documents are split on lines so
        # that max_sentence_length does not silently drop them.
        for doc in documents:
            for line in doc.splitlines():
                line = line.strip()
                if line:
                    yield line[:max_sentence_length]

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        user_defined_symbols=list(user_defined_symbols),
        character_coverage=character_coverage,
        max_sentence_length=max_sentence_length,
        input_sentence_size=input_sentence_size,
        num_threads=num_threads,
        hard_vocab_limit=hard_vocab_limit,
        **_TRAINER_FIXED,
    )
    model_path = prefix.with_name(prefix.name + ".model")
    tmp = model_path.with_name(model_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, model_path)  # readers never see a half-written model
    vocab_path = prefix.with_name(prefix.name + ".vocab")
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab_path.write_text(
        "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size())),
        encoding="utf-8",
    )
    return model_path


# --- provenance: which tokenizer wrote the shards / trained the checkpoint -----------------------

FINGERPRINT_FILE = "tokenizer_fingerprint.json"
FINGERPRINT_VERSION = 1


class TokenizerMismatch(ValueError):
    """Shards, checkpoint and tokenizer disagree; the message names both fingerprints and the override."""


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The file a tokenizer path names (``tokenizer.json`` inside a directory)."""
    p = Path(path)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return p / "tokenizer.json"
    return p


def tokenizer_fingerprint(path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> dict:
    """Content hash of the tokenizer file, vocabulary size and special ids: what makes token ids mean
    the same thing. Two tokenizers with equal fingerprints encode every text identically."""
    import hashlib

    file = tokenizer_file(path)
    tok = tokenizer if tokenizer is not None else load_tokenizer(file)
    return {
        "version": FINGERPRINT_VERSION,
        "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        "vocab_size": int(tok.vocab_size),
        "bos_id": tok.bos_id,
        "eos_id": int(tok.eos_id),
        "pad_id": int(tok.pad_id),
        "file": file.name,
    }


def describe_fingerprint(fp: dict) -> str:
    return (f"{fp.get('file', '?')} sha256 {str(fp.get('sha256', '?'))[:12]}, vocab {fp.get('vocab_size')}, "
            f"bos/eos/pad {fp.get('bos_id')}/{fp.get('eos_id')}/{fp.get('pad_id')}")


def fingerprints_match(a: dict, b: dict) -> bool:
    keys = ("sha256", "vocab_size", "bos_id", "eos_id", "pad_id")
    return all(a.get(k) == b.get(k) for k in keys)


def write_fingerprint(directory: str | os.PathLike, fp: dict, *, role: str) -> Path:
    """Write ``FINGERPRINT_FILE`` into ``directory`` atomically; ``role`` says what it describes."""
    import json

    out = Path(directory) / FINGERPRINT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({**fp, "role": role}, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def read_fingerprint(directory: str | os.PathLike) -> dict | None:
    """The fingerprint recorded in ``directory`` (None when nothing was recorded there)."""
    import json

    path = Path(directory) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TokenizerMismatch(
            f"{path} is unreadable ({err}); restore it or delete it to skip the check"
        ) from None
    if not isinstance(data, dict) or "sha256" not in data:
        raise TokenizerMismatch(
            f"{path} is not a tokenizer fingerprint; restore it or delete it to skip the check"
        )
    return data


def check_fingerprint(recorded: dict | None, actual: dict, *, what: str, tokenizer_path: str | os.PathLike,
                      override: str, allow: bool = False) -> None:
    """Raise :class:`TokenizerMismatch` (one line) when ``recorded`` exists and differs from ``actual``.

    ``what`` names the recorded side ("the shards in /data/x"), ``override`` the flag or key that
    accepts the mismatch.
    """
    if recorded is None or allow or fingerprints_match(recorded, actual):
        return
    raise TokenizerMismatch(
        f"tokenizer {str(tokenizer_path)!r} ({describe_fingerprint(actual)}) is not the one {what} recorded "
        f"({describe_fingerprint(recorded)}); pass the matching tokenizer, or set {override} to use it anyway"
    )


def recorded_checkpoint_fingerprint(path: str | os.PathLike) -> tuple[dict | None, Path]:
    """The fingerprint a checkpoint records: in ``path`` (a checkpoint.dir) or in the run directory
    above an ``iter_*`` checkpoint. Returns (fingerprint or None, where it was looked for)."""
    p = Path(path)
    for directory in (p, p.parent):
        found = read_fingerprint(directory)
        if found is not None:
            return found, directory / FINGERPRINT_FILE
    return None, p / FINGERPRINT_FILE


def check_run_tokenizer(
    tokenizer_path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    split_dirs: Sequence[str | os.PathLike],
    load_path: str | os.PathLike | None,
    allow_mismatch: bool,
    override: str = "data.allow_tokenizer_mismatch=true",
) -> dict:
    """Training start-up: the tokenizer must be the one that wrote the (local) shards and, when a
    checkpoint is loaded, the one it was trained with. Returns the tokenizer's fingerprint."""
    actual = tokenizer_fingerprint(tokenizer_path, tokenizer)
    for split in split_dirs:
        check_fingerprint(read_fingerprint(split), actual, what=f"the shards in {split}",
                          tokenizer_path=tokenizer_path, override=override, allow=allow_mismatch)
    if load_path is not None:
        recorded, where = recorded_checkpoint_fingerprint(load_path)
        check_fingerprint(recorded, actual, what=f"the checkpoint {load_path} ({where.name})",
                          tokenizer_path=tokenizer_path, override=override, allow=allow_mismatch)
    return actual


def check_and_record_run_tokenizer(
    data_section: object,
    tokenizer_path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    checkpoint_dir: str | None,
    load_path: str | os.PathLike | None,
    record: bool,
) -> dict:
    """:func:`check_run_tokenizer` for a training config's ``data`` section (local roots; remote
    shards are checked where they were prepared), then (``record``: rank 0) write the fingerprint
    into ``checkpoint_dir`` so resumption and export can check it."""
    from ssa_megatron.data.sources import is_remote, local_path, source_entries

    entries = source_entries(data_section) + list(getattr(data_section, "valid_streams", []) or [])
    splits = []
    for entry in entries:
        root = entry["path"] if isinstance(entry, dict) else str(entry)
        if is_remote(root):
            continue
        for split in ("train", "val"):
            directory = Path(local_path(root)) / split
            if directory.is_dir() and str(directory) not in splits:
                splits.append(str(directory))
    allow = bool(getattr(data_section, "allow_tokenizer_mismatch", False))
    actual = check_run_tokenizer(tokenizer_path, tokenizer, split_dirs=splits, load_path=load_path,
                                 allow_mismatch=allow)
    if record and checkpoint_dir:
        write_fingerprint(checkpoint_dir, actual, role="checkpoint")
    return actual


def check_tool_tokenizer(
    checkpoint: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None,
    *,
    data: str | os.PathLike | None = None,
    allow_mismatch: bool = False,
    override: str = "--allow-tokenizer-mismatch",
) -> dict | None:
    """Evaluation / export: the tokenizer given, the data's shards and the checkpoint must agree
    on what they recorded. Sides that recorded nothing are not checked. Returns the tokenizer's
    fingerprint (None without a tokenizer file)."""
    actual = None
    if tokenizer_path is not None and tokenizer_file(tokenizer_path).is_file():
        actual = tokenizer_fingerprint(tokenizer_path)
    if allow_mismatch:
        return actual
    sides: list[tuple[str, dict]] = []
    model_fp, where = recorded_checkpoint_fingerprint(checkpoint)
    if model_fp is not None:
        sides.append((f"the checkpoint {checkpoint} ({where.name})", model_fp))
    if data is not None and Path(data).is_dir():
        for split in (Path(data), Path(data) / "val"):
            if (split / "index.json").is_file():
                data_fp = read_fingerprint(split)
                if data_fp is not None:
                    sides.append((f"the shards in {split}", data_fp))
                break
    if actual is not None:
        for what, recorded in sides:
            check_fingerprint(recorded, actual, what=what, tokenizer_path=str(tokenizer_path),
                              override=override)
    if len(sides) == 2 and not fingerprints_match(sides[0][1], sides[1][1]):
        (a_what, a_fp), (b_what, b_fp) = sides
        raise TokenizerMismatch(
            f"{b_what} were written with tokenizer {describe_fingerprint(b_fp)}, but {a_what} was trained "
            f"with {describe_fingerprint(a_fp)}; evaluate on data prepared with the checkpoint's tokenizer, "
            f"or pass {override} to go on anyway"
        )
    return actual


def checkpoint_tokenizer_path(checkpoint: str | os.PathLike) -> str | None:
    """The tokenizer a training checkpoint's saved config names (data.tokenizer, else the demo
    set's tokenizer.model), or None when the config cannot be found."""
    import yaml

    p = Path(checkpoint)
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    try:
        data = yaml.safe_load((p / "config.yaml").read_text()).get("data", {})
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    if data.get("tokenizer"):
        return str(data["tokenizer"])
    return str(Path(data["path"]) / "tokenizer.model") if data.get("path") else None


def record_checkpoint_tokenizer(checkpoint_dir: str | os.PathLike, data_section: object) -> None:
    """After a save (rank 0): record in ``checkpoint_dir`` which tokenizer the run trains with
    (``data.tokenizer``, else the demo set's ``tokenizer.model``); an equal record is left as is."""
    path = getattr(data_section, "tokenizer", "") or str(Path(getattr(data_section, "path", "")) /
                                                         "tokenizer.model")
    if not tokenizer_file(path).is_file():
        return
    actual = tokenizer_fingerprint(path)
    try:
        recorded = read_fingerprint(checkpoint_dir)
    except TokenizerMismatch:
        recorded = None
    if recorded is None or not fingerprints_match(recorded, actual):
        write_fingerprint(checkpoint_dir, actual, role="checkpoint")
