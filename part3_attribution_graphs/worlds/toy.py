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
from sae_lens.saes.transcoder import JumpReLUSkipTranscoderConfig
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformer_lens import HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

__all__ = ["make_toy_world", "make_toy_tokenizer", "TOY_WORDS", "TOY_N_LAYERS"]

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
    """A word-level tokenizer that splits text the way Gemma's SentencePiece model does for these words.

    Words carry their leading space (`" sun"`), newlines are their own token, and the chat-template
    markers are single special tokens, so `format_prompt(...)` starts with the same four tokens as on
    Gemma: `<bos>`, `<start_of_turn>`, `user`, `\\n`.
    """
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + ["\n", "\n\n"]:
        vocab[tok] = len(vocab)
    words = list(dict.fromkeys(TOY_WORDS))
    for w in words + PUNCTUATION + [str(d) for d in range(10)]:
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
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        clean_up_tokenization_spaces=False,
        add_bos_token=True,
        name_or_path="toy-world-g3",  # no "gemma" here: TransformerLens special-cases that name,
    )
    fast.padding_side = "right"
    return fast


def _toy_config(d_vocab: int, dtype: torch.dtype) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        d_model=D_MODEL,
        d_head=16,
        n_heads=4,
        n_key_value_heads=2,  # grouped-query attention, as in Gemma 3
        d_mlp=128,
        n_layers=TOY_N_LAYERS,
        n_ctx=128,
        d_vocab=d_vocab,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        use_normalization_before_and_after=True,
        use_qk_norm=True,
        gated_mlp=True,
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_base=1_000_000,
        rotary_base_local=10_000,
        use_local_attn=True,
        window_size=6,
        attn_types=["local", "local", "global", "local"],
        use_attn_scale=True,
        eps=1e-6,
        original_architecture="Gemma3ForCausalLM",
        default_prepend_bos=True,
        tokenizer_prepends_bos=False,
        dtype=dtype,
        seed=None,
        init_weights=False,
    )


@torch.no_grad()
def _fill_model_weights(model: HookedSAETransformer, gen: torch.Generator) -> None:
    d = model.cfg.d_model
    for name, p in sorted(model.named_parameters()):
        shape = p.shape
        if name.endswith(".w"):  # RMSNorm weights: Gemma stores 1 + w, and they are far from 1
            val = 1.0 + 0.5 * torch.randn(shape, generator=gen)
        elif name.split(".")[-1].lstrip("_").startswith("b_"):  # Gemma has no biases (GQA's _b_K, _b_V too)
            val = torch.zeros(shape)
        elif name == "embed.W_E":
            val = torch.randn(shape, generator=gen) / d**0.5 * d**0.5  # unit-ish rows, times sqrt(d)
        elif name == "unembed.W_U":
            val = torch.randn(shape, generator=gen) / d**0.5
        else:
            fan_in = shape[-2] if p.ndim >= 2 else shape[-1]
            val = torch.randn(shape, generator=gen) / fan_in**0.5
        p.copy_(val.to(p.dtype))


def _calibration_tokens(model: HookedSAETransformer, gen: torch.Generator) -> torch.Tensor:
    """Random word sequences (after a BOS) to fit skips and thresholds on."""
    n_special = len(SPECIAL_TOKENS)
    toks = torch.randint(n_special, model.cfg.d_vocab, (24, 32), generator=gen)
    toks[:, 0] = model.tokenizer.bos_token_id
    return toks


@torch.no_grad()
def _make_transcoder(
    layer: int, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, dtype: torch.dtype
) -> JumpReLUSkipTranscoder:
    """Fit a skip transcoder to (MLP input x, MLP output y) pairs, in float64 then cast."""
    d = x.shape[-1]
    cfg = JumpReLUSkipTranscoderConfig(
        d_in=d, d_sae=D_SAE, d_out=d, dtype="float32", device="cpu", apply_b_dec_to_input=False
    )
    cfg.metadata.hook_name = f"blocks.{layer}.mlp.hook_in"
    cfg.metadata.hook_name_out = f"blocks.{layer}.hook_mlp_out"
    cfg.metadata.model_name = "toy-gemma-3"
    tc = JumpReLUSkipTranscoder(cfg)

    x64, y64 = x.double(), y.double()
    # Affine skip: least squares y ~ x @ W_skip.T + b (b becomes part of b_dec). Non-symmetric.
    x_aug = torch.cat([x64, torch.ones(len(x64), 1, dtype=torch.float64)], dim=1)
    sol = torch.linalg.lstsq(x_aug, y64).solution  # (d+1, d)
    W_skip = sol[:d].T.contiguous()
    b_skip = sol[d]
    resid = y64 - x_aug @ sol

    W_enc = torch.randn(d, D_SAE, generator=gen, dtype=torch.float64) / d**0.5
    pre = x64 @ W_enc
    # b_enc shifts every latent a little; thresholds sit at the (1 - L0/d_sae) quantile per latent.
    b_enc = 0.1 * torch.randn(D_SAE, generator=gen, dtype=torch.float64)
    q = 1.0 - TARGET_L0 / D_SAE
    threshold = torch.quantile(pre + b_enc, q, dim=0).clamp(min=1e-3)
    acts = torch.where(pre + b_enc > threshold, (pre + b_enc).clamp(min=0), torch.zeros_like(pre))

    # Decoder: ridge fit of what the skip misses, so the error nodes are smaller than the MLP output.
    ridge = 1e-1 * torch.eye(D_SAE, dtype=torch.float64)
    W_dec = torch.linalg.solve(acts.T @ acts + ridge, acts.T @ resid)
    b_dec = b_skip + 0.05 * torch.randn(d, generator=gen, dtype=torch.float64)

    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold,
              "W_skip": W_skip}
    for name, val in params.items():
        getattr(tc, name).copy_(val.float())
    tc.eval()
    return tc.to(dtype) if dtype != torch.float32 else tc


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
    gen = torch.Generator().manual_seed(seed)
    tokenizer = make_toy_tokenizer()
    model = HookedSAETransformer(_toy_config(len(tokenizer), torch.float32), tokenizer=tokenizer,
                                 move_to_device=False)
    _fill_model_weights(model, gen)
    model.eval()
    model.set_use_hook_mlp_in(True)

    # Fit every transcoder to its own MLP on calibration text, always in float32 for bit-stable results.
    calib = _calibration_tokens(model, gen)
    names = [f"blocks.{layer}.{site}" for layer in range(TOY_N_LAYERS) for site in ("mlp.hook_in", "hook_mlp_out")]
    with torch.no_grad():
        _, cache = model.run_with_cache(calib, names_filter=lambda n: n in names)
    transcoders = {}
    for layer in range(TOY_N_LAYERS):
        x = cache[f"blocks.{layer}.mlp.hook_in"][:, 1:].reshape(-1, D_MODEL)
        y = cache[f"blocks.{layer}.hook_mlp_out"][:, 1:].reshape(-1, D_MODEL)
        transcoders[layer] = _make_transcoder(layer, x, y, gen, dtype)

    if dtype != torch.float32:
        model = model.to(dtype)
        model.cfg.dtype = dtype
    return model, transcoders
