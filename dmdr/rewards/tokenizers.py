"""Local-only tokenizers for the text-to-image rewards, with a loud check against near-empty vocabularies.

Why this file exists (docs/rewards.md, ecosystem facts): with ``HF_HUB_OFFLINE=1``, transformers 5
``BertTokenizer.from_pretrained("bert-base-uncased")`` silently returns a 5-token tokenizer and
``CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")`` a 2-token one (every word becomes ``[UNK]``),
and ``BertTokenizer(vocab_file=...)`` / ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently ignore the
file. A reward trained on such ids still returns numbers, just meaningless ones. So we only build tokenizers
from explicit local files, with the ``vocab=`` / ``merges=`` arguments that transformers 5 honours, and raise
:class:`MissingTokenizerError` when a file is missing or the vocabulary is suspiciously small.

* ImageReward: bert-base-uncased WordPiece (``vocab.txt``, 30,522 lines) + ``[DEC]`` as bos and ``[ENC]`` as an
  additional special token (BLIP's ``init_tokenizer``), padded/truncated to 35 tokens.
* CLIP / HPSv2 / PickScore: CLIP byte-level BPE (``vocab.json`` + ``merges.txt``, 49,408 tokens), padded to 77.

For tests and smoke runs, :func:`byte_level_clip_tokenizer` writes a 514-token byte-level CLIP vocabulary (no merges)
and :func:`tiny_bert_tokenizer` a character-level WordPiece vocabulary; both need ``allow_small=True``.

>>> import tempfile
>>> tok = byte_level_clip_tokenizer(tempfile.mkdtemp())
>>> len(tok), clip_token_ids(tok, ["a cat"], max_length=8).tolist()
(514, [[512, 320, 66, 64, 339, 513, 513, 513]])
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from dmdr.errors import UserError

MIN_VOCAB = 1000
BERT_MAX_LENGTH = 35   # ImageReward: padding="max_length", truncation=True, max_length=35
CLIP_MAX_LENGTH = 77   # CLIP context length

_BERT_HINT = ("pass the bert-base-uncased vocab.txt (30,522 lines) as the reward's tokenizer, "
              "e.g. --set stages.<i>.rewards.<j>.kwargs.tokenizer=/path/to/vocab.txt")
_CLIP_HINT = ("pass a directory holding the CLIP vocab.json and merges.txt (e.g. a local copy of "
              "laion/CLIP-ViT-H-14-laion2B-s32B-b79K) as the reward's tokenizer, "
              "e.g. --set stages.<i>.rewards.<j>.kwargs.tokenizer=/path/to/tokenizer_dir")


class MissingTokenizerError(UserError):
    """A reward tokenizer is missing or too small to be real (one line: which file, how to supply it)."""


def check_vocab(tokenizer: Any, source: str, *, hint: str, allow_small: bool = False,
                min_vocab: int = MIN_VOCAB) -> Any:
    """Raise :class:`MissingTokenizerError` when ``len(tokenizer) < min_vocab`` (unless ``allow_small``)."""
    n = len(tokenizer)
    if n < min_vocab and not allow_small:
        raise MissingTokenizerError(
            f"tokenizer from {source} has only {n} tokens (< {min_vocab}), which looks like a placeholder or an "
            f"offline stub; {hint}")
    return tokenizer


def _require_file(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise MissingTokenizerError(f"{what} not found at {path}; {hint}")
    return path


# ---- BERT (ImageReward) ---------------------------------------------------------------------------------------

def load_bert_tokenizer(vocab_path: str | os.PathLike, *, allow_small: bool = False):
    """BLIP/ImageReward tokenizer from a local bert-base-uncased ``vocab.txt`` (or a directory holding one).

    Adds ``[DEC]`` (bos) and ``[ENC]`` (additional special token) as BLIP's ``init_tokenizer`` does, so the real
    vocabulary ends with ids 30522 / 30523 (the ImageReward text encoder has 30,524 rows).
    """
    from transformers import BertTokenizer

    p = Path(vocab_path)
    if p.is_dir():
        p = p / "vocab.txt"
    _require_file(p, "ImageReward tokenizer vocab.txt", _BERT_HINT)
    tok = BertTokenizer(vocab=str(p), do_lower_case=True)   # NOT vocab_file=: transformers 5 ignores it
    check_vocab(tok, str(p), hint=_BERT_HINT, allow_small=allow_small)
    return _add_blip_specials(tok)


def _add_blip_specials(tok):
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.model_max_length = BERT_MAX_LENGTH
    return tok


def tiny_wordpiece_vocab() -> list[str]:
    """A character-level WordPiece vocabulary (specials, a-z, 0-9, punctuation and their ``##`` forms)."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    punct = list(".,;:!?'\"-()[]/&+*%$#@")
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + punct
            + ["##" + c for c in chars + punct])


def tiny_bert_tokenizer(tmpdir: str | os.PathLike | None = None):
    """A BLIP-style tokenizer over :func:`tiny_wordpiece_vocab` (for tests and smoke runs only).

    With ``tmpdir`` the vocabulary is written to ``tmpdir/vocab.txt`` and loaded through
    :func:`load_bert_tokenizer` (``allow_small=True``); otherwise it is built in memory.
    """
    from transformers import BertTokenizer

    words = tiny_wordpiece_vocab()
    if tmpdir is None:
        return _add_blip_specials(BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True))
    path = Path(tmpdir) / "vocab.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return load_bert_tokenizer(path, allow_small=True)


def bert_token_ids(tokenizer, prompts: Sequence[str], max_length: int = BERT_MAX_LENGTH) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, both (B, max_length) long, as ImageReward tokenises prompts."""
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ---- CLIP (CLIP / HPSv2 / PickScore) --------------------------------------------------------------------------

def _clip_files(dir_or_files: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[Path, Path]:
    if isinstance(dir_or_files, (str, os.PathLike)):
        d = Path(dir_or_files)
        if d.is_dir():
            return d / "vocab.json", d / "merges.txt"
        raise MissingTokenizerError(f"CLIP tokenizer directory not found at {d}; {_CLIP_HINT}")
    files = [Path(f) for f in dir_or_files]
    if len(files) != 2:
        raise MissingTokenizerError(f"expected (vocab.json, merges.txt); got {len(files)} paths; {_CLIP_HINT}")
    return files[0], files[1]


def load_clip_tokenizer(dir_or_files: str | os.PathLike | Sequence[str | os.PathLike], *,
                        allow_small: bool = False):
    """CLIP BPE tokenizer from a directory with ``vocab.json`` + ``merges.txt`` (or the two paths).

    Pads with ``<|endoftext|>`` (the HF convention; open_clip pads with 0 — the pooled eot feature is the same).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_files(dir_or_files)
    _require_file(vocab, "CLIP tokenizer vocab.json", _CLIP_HINT)
    _require_file(merges, "CLIP tokenizer merges.txt", _CLIP_HINT)
    tok = CLIPTokenizer(vocab=str(vocab), merges=str(merges))   # NOT vocab_file=/merges_file=: ignored in v5
    check_vocab(tok, str(vocab), hint=_CLIP_HINT, allow_small=allow_small)
    tok.model_max_length = CLIP_MAX_LENGTH
    return tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode character table (256 entries)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_level_clip_vocab() -> dict[str, int]:
    """514 tokens: the 256 byte characters, the same with ``</w>``, then ``<|startoftext|>`` (512) and
    ``<|endoftext|>`` (513)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def byte_level_clip_tokenizer(tmpdir: str | os.PathLike):
    """Write a 514-token byte-level ``vocab.json`` / ``merges.txt`` (no merges) to ``tmpdir`` and load it.

    For tests and smoke runs with tiny random CLIP models (``vocab_size=514``, eos id 513).
    """
    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(byte_level_clip_vocab()), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return load_clip_tokenizer(d, allow_small=True)


def byte_level_clip_tokenizer_in_memory():
    """The same tokenizer as :func:`byte_level_clip_tokenizer`, built without touching the disk."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=byte_level_clip_vocab(), merges=[])
    tok.model_max_length = CLIP_MAX_LENGTH
    return tok


def clip_token_ids(tokenizer, prompts: Sequence[str], max_length: int = CLIP_MAX_LENGTH) -> Tensor:
    """(B, max_length) long ids, padded and truncated to ``max_length`` (the official DMDR call)."""
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"]


def resolve_tokenizer(tokenizer: Any, *, kind: str, default_dir: str | os.PathLike | None = None,
                      tiny: bool = False):
    """Turn a reward's ``tokenizer`` option into a tokenizer.

    ``tokenizer`` may be a tokenizer object (used as is), a path, or ``None``: then ``default_dir`` is tried
    (e.g. an HF checkpoint directory that ships its tokenizer files), then, for ``tiny`` configs only, the built-in
    test tokenizer; otherwise :class:`MissingTokenizerError`.
    """
    if kind not in ("bert", "clip"):
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    load = load_bert_tokenizer if kind == "bert" else load_clip_tokenizer
    if tokenizer is not None:
        return load(tokenizer, allow_small=tiny)
    if default_dir is not None:
        d = Path(default_dir)
        marker = d / ("vocab.txt" if kind == "bert" else "vocab.json")
        if d.is_dir() and marker.is_file():
            return load(d, allow_small=tiny)
    if tiny:
        return tiny_bert_tokenizer() if kind == "bert" else byte_level_clip_tokenizer_in_memory()
    raise MissingTokenizerError(f"no tokenizer given for this reward; {_BERT_HINT if kind == 'bert' else _CLIP_HINT}")


__all__ = [
    "MissingTokenizerError", "MIN_VOCAB", "BERT_MAX_LENGTH", "CLIP_MAX_LENGTH", "check_vocab",
    "load_bert_tokenizer", "tiny_wordpiece_vocab", "tiny_bert_tokenizer", "bert_token_ids",
    "load_clip_tokenizer", "byte_level_clip_vocab", "byte_level_clip_tokenizer", "byte_level_clip_tokenizer_in_memory",
    "clip_token_ids", "resolve_tokenizer",
]
