"""Gemma 3's SentencePiece-BPE tokenizer, rebuilt from the vocabulary inside a GGUF file.

transformers' GGUF converter turns Gemma 3's vocabulary into a *Unigram* tokenizer, which segments
words differently from Gemma (`user` comes out as `us|er`). Gemma 3's SentencePiece model is a BPE
model, so this module rebuilds it as a `tokenizers` BPE model:

* vocabulary: `tokenizer.ggml.tokens` in id order; pieces are SentencePiece pieces (`▁` for a space);
* merges: SentencePiece BPE merges two adjacent symbols whenever their concatenation is a normal
  piece, highest-scoring piece first. Every way of splitting a normal piece into two normal pieces
  becomes one merge rule, ranked by the score of the merged piece, which reproduces that order;
* user-defined pieces (runs of newlines, spaces or tabs, `<start_of_image>`, ...) are matched whole
  before BPE, as SentencePiece does; llama.cpp wrote the space runs with real spaces, so they are put
  back to `▁` form;
* control pieces (`<bos>`, `<eos>`, `<pad>`, `<start_of_turn>`, `<end_of_turn>`, `<unusedN>`, ...)
  are special tokens; `<bos>` is prepended on encode;
* no normaliser beyond `' '` -> `'▁'` (Gemma 3 has `add_dummy_prefix=False`), byte fallback for
  characters outside the vocabulary. The vocabulary has no multi-digit ASCII piece, so digits come out
  one per token with no extra pre-tokeniser, as in SentencePiece.

`sentencepiece_reference_proto` builds the equivalent SentencePiece `ModelProto`, which the tests use
as the reference implementation.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = [
    "GGUFVocab",
    "build_gemma3_tokenizer",
    "read_gguf_metadata",
    "read_gguf_vocab",
    "sentencepiece_reference_proto",
    "wrap_gemma3_tokenizer",
]

# SentencePiece piece types, as stored in `tokenizer.ggml.token_type`.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TOKENIZER_NAME = "g3-270m-gguf-bpe"  # no "gemma": TransformerLens special-cases such names
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"


@dataclass(frozen=True)
class GGUFVocab:
    """A SentencePiece vocabulary as stored in a GGUF file (pieces already in `▁` form)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int


_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(gguf_path: str | Path) -> dict[str, Any]:
    """Read the key-value header of a GGUF (v2/v3, little-endian) file; tensors are not read.

    Numeric arrays come back as numpy arrays, string arrays as lists of str.
    """
    with open(gguf_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{gguf_path} is not a GGUF file")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        pos = 24

        def read_string(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, pos)
            return buf[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n

        def read_value(vtype: int, pos: int) -> tuple[Any, int]:
            if vtype == _STRING:
                return read_string(pos)
            if vtype == _ARRAY:
                item_type, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item_type in _SCALAR_FORMATS:
                    dt = np.dtype(_SCALAR_FORMATS[item_type].replace("?", "b1"))
                    arr = np.frombuffer(buf, dtype=dt, count=count, offset=pos).copy()
                    return arr, pos + dt.itemsize * count
                items = []
                for _ in range(count):
                    item, pos = read_value(item_type, pos)
                    items.append(item)
                return items, pos
            fmt = _SCALAR_FORMATS[vtype]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = read_string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            meta[key], pos = read_value(vtype, pos + 4)
    return meta


def read_gguf_vocab(gguf_path: str | Path) -> GGUFVocab:
    """Read pieces, scores, types and special ids from a GGUF file's `tokenizer.ggml.*` fields."""
    meta = read_gguf_metadata(gguf_path)
    if meta["tokenizer.ggml.model"] != "llama":
        raise ValueError(
            f"expected a SentencePiece ('llama') vocabulary, got {meta['tokenizer.ggml.model']!r}"
        )
    pieces: list[str] = meta["tokenizer.ggml.tokens"]
    scores = [float(s) for s in meta["tokenizer.ggml.scores"]]
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    if not len(pieces) == len(scores) == len(types):
        raise ValueError("GGUF tokenizer fields have different lengths")
    # llama.cpp stores user-defined whitespace pieces with real spaces; SentencePiece uses '▁'.
    pieces = [p.replace(" ", "▁") if t == USER_DEFINED else p for p, t in zip(pieces, types)]
    return GGUFVocab(
        pieces=pieces,
        scores=scores,
        types=types,
        bos_id=int(meta["tokenizer.ggml.bos_token_id"]),
        eos_id=int(meta["tokenizer.ggml.eos_token_id"]),
        pad_id=int(meta["tokenizer.ggml.padding_token_id"]),
        unk_id=int(meta["tokenizer.ggml.unknown_token_id"]),
    )


def _bpe_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """Merge rules equivalent to SentencePiece BPE: every (left, right) split of each normal piece
    into two normal pieces, ordered by the merged piece's score (highest first), then by id."""
    normal = {p for p, t in zip(vocab.pieces, vocab.types) if t == NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for idx, (piece, score, typ) in enumerate(zip(vocab.pieces, vocab.scores, vocab.types)):
        if typ != NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, idx, k, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def build_gemma3_tokenizer(gguf_path: str | Path) -> PreTrainedTokenizerFast:
    """Build Gemma 3's BPE tokenizer from a GGUF file; encoding prepends `<bos>`."""
    vocab = read_gguf_vocab(gguf_path)
    specials = {vocab.pad_id: PAD, vocab.eos_id: EOS, vocab.bos_id: BOS, vocab.unk_id: UNK}
    for idx, name in specials.items():
        if vocab.pieces[idx] != name:
            raise ValueError(f"expected piece {name!r} at id {idx}, got {vocab.pieces[idx]!r}")
    token_to_id = {p: i for i, p in enumerate(vocab.pieces)}
    if len(token_to_id) != len(vocab.pieces):
        raise ValueError("GGUF vocabulary has duplicate pieces")
    tok = Tokenizer(
        models.BPE(
            vocab=token_to_id, merges=_bpe_merges(vocab), unk_token=UNK, byte_fallback=True, fuse_unk=True
        )
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])

    # Control pieces are special (matched on raw text, skipped by decode(skip_special_tokens=True));
    # user-defined pieces are matched whole on the normalised text, before BPE.
    tok.add_special_tokens(
        [
            AddedToken(p, special=True, normalized=False)
            for p, t in zip(vocab.pieces, vocab.types)
            if t in (CONTROL, UNKNOWN)
        ]
    )
    tok.add_tokens(
        [
            AddedToken(p, special=False, normalized=True)
            for p, t in zip(vocab.pieces, vocab.types)
            if t == USER_DEFINED
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, vocab.bos_id)]
    )
    return wrap_gemma3_tokenizer(tok)


def wrap_gemma3_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` built by `build_gemma3_tokenizer` (e.g. reloaded from its JSON)."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        clean_up_tokenization_spaces=False,
        add_bos_token=True,  # TransformerLens keeps a tokenizer with this flag instead of downloading one
        add_eos_token=False,
        name_or_path=TOKENIZER_NAME,
    )
    fast.padding_side = "right"
    return fast


def sentencepiece_reference_proto(gguf_path: str | Path) -> bytes:
    """A serialised SentencePiece BPE `ModelProto` with the GGUF's pieces, for cross-checking.

    Control pieces other than `<pad>`, `<eos>`, `<bos>` and `<unk>` are made user-defined here, so that
    SentencePiece matches `<start_of_turn>` and friends in text the way the Hugging Face tokenizer does.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    vocab = read_gguf_vocab(gguf_path)
    proto = sp_pb2.ModelProto()
    keep_control = {vocab.pad_id, vocab.eos_id, vocab.bos_id}
    for i, (piece, score, typ) in enumerate(zip(vocab.pieces, vocab.scores, vocab.types)):
        sp = proto.pieces.add()
        sp.piece = piece
        sp.score = score
        if i == vocab.unk_id:
            sp.type = UNKNOWN
        elif typ == CONTROL and i not in keep_control:
            sp.type = USER_DEFINED
        else:
            sp.type = typ
    ts = proto.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.BPE
    ts.vocab_size = len(vocab.pieces)
    ts.byte_fallback = True
    ts.split_digits = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.pad_id
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()
