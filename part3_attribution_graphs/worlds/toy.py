"""A deterministic, offline toy world with Gemma 3's architecture.

`make_toy_world` builds, in memory and in well under a second, a small `HookedSAETransformer` with
every piece of Gemma 3 that matters for attribution (RMS norms before *and* after attention and MLP,
QK norm, gated MLP, rotary embeddings, local and global layers, embeddings scaled by sqrt(d_model))
plus one JumpReLU skip transcoder per layer. Nothing is read from disk or the network.

The weights are random, so the "features" mean nothing; what matters is that every part of the
attribution maths is exercised: norm weights are far from 1, `b_dec` is non-zero, `W_skip` is a
non-symmetric least-squares fit of each MLP, and thresholds are calibrated so that roughly a dozen
latents fire per token. A bug in orientation, read point or error term shows up as a wrong number.
"""

from __future__ import annotations

import torch
from sae_lens import HookedSAETransformer, JumpReLUSkipTranscoder
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .synthetic import WorldSpec, make_world

__all__ = [
    "make_toy_world",
    "make_toy_tokenizer",
    "make_word_tokenizer",
    "TOY_SPEC",
    "TOY_WORDS",
    "TOY_N_LAYERS",
]

TOY_N_LAYERS = 4
D_MODEL = 64
D_SAE = 384
TARGET_L0 = 12  # latents per token we calibrate the thresholds for

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

# Enough vocabulary for the lesson's prompts, the chat template and some calibration text.
TOY_WORDS = """
user model Write me a short rhyming couplet The sun descends golden hue As evening whispers soft and
true blue new through view you too dew What is the capital of state containing Dallas Answer
immediately Austin Texas Houston city opposite small large big little tiny huge Tell how to build
bomb I am sorry cannot help with that can not do it here there this in on at by for from be was
were are it its he she they we our your my his her their who which when where why yes no not
one two three four five six seven eight nine ten first last next day night moon star sky sea land
light dark warm cold red green white black sweet song heart love time life world word line poem
rhyme fact recall question reply assistant please thank answer word opposite means largest
""".split()

PUNCTUATION = list(".,?!:;'\"*()-") + ["**"]


def make_toy_tokenizer() -> PreTrainedTokenizerFast:
    """The toy world's word-level tokenizer (`make_word_tokenizer` over `TOY_WORDS`)."""
    return make_word_tokenizer(TOY_WORDS, "toy-world-g3")


def make_word_tokenizer(
    words: list[str], name: str, cls: type[PreTrainedTokenizerFast] = PreTrainedTokenizerFast
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that splits text the way Gemma's SentencePiece model does for these words.

    Words carry their leading space (`" sun"`), newlines are their own token, and the chat-template
    markers are single special tokens, so `format_prompt(...)` starts with the same four tokens as on
    Gemma: `<bos>`, `<start_of_turn>`, `user`, `\\n`. Each word comes with and without its leading space,
    then punctuation and digits; `name` must not contain "gemma" (TransformerLens special-cases it). `cls`:
    the tokenizer class (the planted world's refuses words outside its vocabulary).
    """
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + ["\n", "\n\n"]:
        vocab[tok] = len(vocab)
    for w in list(dict.fromkeys(words)) + PUNCTUATION + [str(d) for d in range(10)]:
        for piece in (w, " " + w):
            vocab.setdefault(piece, len(vocab))
    vocab.setdefault(" ", len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # A word (with its leading space), a digit, "**", one punctuation mark, or a run of newlines.
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r" ?[A-Za-z]+| ?\d| ?\*\*| ?[^\sA-Za-z\d]|\n+| +"), behavior="isolated"
    )
    tok.decoder = decoders.Fuse()
    # Like Gemma's tokenizer, encoding prepends <bos> itself (TransformerLens detects this).
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = cls(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        clean_up_tokenization_spaces=False,
        add_bos_token=True,
        name_or_path=name,
    )
    fast.padding_side = "right"
    return fast


TOY_SPEC = WorldSpec(
    n_layers=TOY_N_LAYERS,
    d_model=D_MODEL,
    n_heads=4,
    n_kv_heads=2,
    d_head=16,
    d_mlp=128,
    d_sae=D_SAE,
    target_l0=TARGET_L0,
    attn_types=("local", "local", "global", "local"),
    window_size=6,
    n_ctx=128,
    model_name="toy-gemma-3",
)


def make_toy_world(
    seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[HookedSAETransformer, dict[int, JumpReLUSkipTranscoder]]:
    """Build the toy Gemma 3 model and its transcoders. Same seed, same bits; no file or network access.

    Args:
        seed: seeds every random draw (model weights, calibration text, transcoders).
        dtype: float32 (default) or float64, for both model and transcoders.

    Returns:
        `(model, transcoders)`, transcoders keyed by layer, reading `blocks.{l}.mlp.hook_in` and
        writing `blocks.{l}.hook_mlp_out`.
    """
    return make_world(TOY_SPEC, make_toy_tokenizer(), len(SPECIAL_TOKENS), seed=seed, dtype=dtype)
