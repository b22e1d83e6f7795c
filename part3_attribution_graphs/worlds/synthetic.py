"""Random-weight Gemma 3 worlds of any shape, with skip transcoders fitted to their own MLPs.

One builder, `make_world(spec)`, serves the lesson's toy world (`toy.TOY_SPEC`) and the benchmark's
larger shapes (`tools/bench.py`). The fitting pieces (`new_skip_transcoder`, `fit_affine_skip`,
`set_transcoder_params`) are also what the real-model world (`gemma270m`) builds its transcoders with.

A world is Gemma 3's architecture (RMS norms before and after attention and MLP, QK norm, gated MLP,
rotary embeddings, local and global layers) with random weights: norm weights far from 1, no biases.
Each layer's transcoder has a least-squares affine skip (non-symmetric), a random encoder whose
thresholds make about `target_l0` latents fire per token on random calibration text, a ridge-fitted
decoder (random for wide transcoders, where a d_sae x d_sae solve is not worth it) and a non-zero `b_dec`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from sae_lens import HookedSAETransformer, JumpReLUSkipTranscoder
from sae_lens.saes.transcoder import JumpReLUSkipTranscoderConfig
from torch import Tensor
from transformer_lens import HookedTransformerConfig
from transformers import PreTrainedTokenizerBase

__all__ = ["WorldSpec", "make_world", "new_skip_transcoder", "fit_affine_skip", "set_transcoder_params"]

QUANTILE_MAX = 16_000_000  # torch.quantile's input limit; above it thresholds are found by bisection
RIDGE_MAX_D_SAE = 4096  # wider decoders are drawn at random instead of solved for


@dataclass(frozen=True)
class WorldSpec:
    """The shape of a random-weight Gemma 3 world, its transcoders, and (for benchmarks) its prompt."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_sae: int
    target_l0: int  # latents firing per token, on average over the calibration text
    attn_types: tuple[str, ...]
    window_size: int
    user: str = ""
    response: str = ""
    n_tokens: int = 0  # the benchmark prompt's length, checked (0: no prompt)
    d_vocab: int | None = None  # None: the tokenizer's vocabulary
    n_ctx: int = 256  # positions the rotary tables cover
    model_name: str = "bench-gemma-3"  # written into the transcoders' metadata


def new_skip_transcoder(
    layer: int,
    d_in: int,
    d_sae: int,
    model_name: str,
    device: str = "cpu",
) -> JumpReLUSkipTranscoder:
    """An empty float32 skip transcoder reading `blocks.{layer}.mlp.hook_in`, writing `hook_mlp_out`."""
    cfg = JumpReLUSkipTranscoderConfig(
        d_in=d_in, d_sae=d_sae, d_out=d_in, dtype="float32", device=str(device), apply_b_dec_to_input=False
    )
    cfg.metadata.hook_name = f"blocks.{layer}.mlp.hook_in"
    cfg.metadata.hook_name_out = f"blocks.{layer}.hook_mlp_out"
    cfg.metadata.model_name = model_name
    return JumpReLUSkipTranscoder(cfg).eval()


def fit_affine_skip(x: Float[Tensor, "n d"], y: Float[Tensor, "n d"]) -> tuple[Tensor, Tensor, Tensor]:
    """Least squares `y ~ x @ W_skip.T + b` in float64: `(W_skip (d_out, d_in), b, residual)`."""
    n, d = x.shape
    x_aug = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)
    sol = torch.linalg.lstsq(x_aug, y).solution  # (d + 1, d)
    return sol[:d].T.contiguous(), sol[d], y - x_aug @ sol


@torch.no_grad()
def set_transcoder_params(tc: JumpReLUSkipTranscoder, **params: Tensor) -> JumpReLUSkipTranscoder:
    """Copy float64 fits into the transcoder's float32 parameters."""
    for name, value in params.items():
        getattr(tc, name).copy_(value.float())
    return tc


def _config(spec: WorldSpec, d_vocab: int, device: str) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        d_model=spec.d_model,
        d_head=spec.d_head,
        n_heads=spec.n_heads,
        n_key_value_heads=spec.n_kv_heads,
        d_mlp=spec.d_mlp,
        n_layers=spec.n_layers,
        n_ctx=spec.n_ctx,
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
        window_size=spec.window_size,
        attn_types=list(spec.attn_types),
        use_attn_scale=True,
        eps=1e-6,
        original_architecture="Gemma3ForCausalLM",
        default_prepend_bos=True,
        tokenizer_prepends_bos=False,
        dtype=torch.float32,
        device=device,
        seed=None,
        init_weights=False,
    )


@torch.no_grad()
def _fill_weights(model: HookedSAETransformer, gen: torch.Generator) -> None:
    """Random weights: norm weights 1 + N(0, 0.5^2) (Gemma stores 1 + w), no biases, fan-in scaling."""
    d = model.cfg.d_model
    for name, p in sorted(model.named_parameters()):
        if name.endswith(".w"):
            p.normal_(generator=gen).mul_(0.5).add_(1.0)
        elif name.split(".")[-1].lstrip("_").startswith("b_"):  # Gemma has no biases (GQA's _b_K, _b_V too)
            p.zero_()
        elif name == "embed.W_E":  # unit-variance entries: rows of norm about sqrt(d_model)
            p.normal_(generator=gen)
        elif name == "unembed.W_U":
            p.normal_(generator=gen).div_(d**0.5)
        else:
            fan_in = p.shape[-2] if p.ndim >= 2 else p.shape[-1]
            p.normal_(generator=gen).div_(fan_in**0.5)


@torch.no_grad()
def _fit_transcoder(
    layer: int, x: Float[Tensor, "n d"], y: Float[Tensor, "n d"], spec: WorldSpec, gen: torch.Generator
) -> JumpReLUSkipTranscoder:
    """A skip transcoder for one MLP: affine skip, random encoder, thresholds for L0, ridge decoder."""
    d, dev = x.shape[1], x.device
    x64, y64 = x.double(), y.double()
    W_skip, b_skip, resid = fit_affine_skip(x64, y64)

    W_enc = torch.randn(d, spec.d_sae, generator=gen, dtype=torch.float64, device=dev) / d**0.5
    b_enc = 0.1 * torch.randn(spec.d_sae, generator=gen, dtype=torch.float64, device=dev)
    pre = x64 @ W_enc + b_enc
    if pre.numel() <= QUANTILE_MAX:  # each latent fires on the top L0 / d_sae of the calibration tokens
        threshold = torch.quantile(pre, 1.0 - spec.target_l0 / spec.d_sae, dim=0)
    else:  # threshold = mu + z sd per latent; bisect z until the mean L0 hits the target
        mu, sd = pre.mean(0), pre.std(0)
        lo, hi = 0.0, 20.0
        for _ in range(40):
            z = (lo + hi) / 2
            l0 = (pre > mu + z * sd).sum(1).double().mean()
            lo, hi = (z, hi) if l0 > spec.target_l0 else (lo, z)
        threshold = mu + hi * sd
    threshold = threshold.clamp(min=1e-3)
    acts = torch.where(pre > threshold, pre.clamp(min=0), torch.zeros_like(pre))

    if spec.d_sae <= RIDGE_MAX_D_SAE:  # ridge fit of what the skip misses: error nodes smaller than the MLP
        gram = acts.T @ acts + 1e-1 * torch.eye(spec.d_sae, dtype=torch.float64, device=dev)
        W_dec = torch.linalg.solve(gram, acts.T @ resid)
    else:  # random, scaled to half the residual
        W_dec = torch.randn(spec.d_sae, d, generator=gen, dtype=torch.float64, device=dev)
        W_dec *= 0.5 * resid.norm(dim=-1).mean() / (acts @ W_dec).norm(dim=-1).mean().clamp(min=1e-12)
    b_dec = b_skip + 0.05 * torch.randn(d, generator=gen, dtype=torch.float64, device=dev)
    tc = new_skip_transcoder(layer, d, spec.d_sae, spec.model_name, str(dev))
    return set_transcoder_params(
        tc, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold, W_skip=W_skip
    )


def make_world(
    spec: WorldSpec,
    tokenizer: PreTrainedTokenizerBase,
    n_special: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[HookedSAETransformer, dict[int, JumpReLUSkipTranscoder]]:
    """A random-weight Gemma 3 model of this shape and one fitted skip transcoder per layer.

    Same spec and seed, same bits. Fitting runs in float32 (model) and float64 (maths) whatever `dtype`.

    Args:
        tokenizer: serves every size; a larger `spec.d_vocab` only widens the (un)embedding.
        n_special: token ids below this are special and never appear in the calibration text.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    cfg = _config(spec, spec.d_vocab or len(tokenizer), device)
    model = HookedSAETransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    _fill_weights(model, gen)
    model.eval()
    model.set_use_hook_mlp_in(True)

    # Calibration text: random tokens after a BOS, enough of them to fit a d_model x d_model skip.
    n_seq = max(24, 3 * spec.d_model // 31 + 1)
    calib = torch.randint(n_special, len(tokenizer), (n_seq, 32), generator=gen, device=device)
    calib[:, 0] = tokenizer.bos_token_id
    names = {
        f"blocks.{layer}.{site}" for layer in range(spec.n_layers) for site in ("mlp.hook_in", "hook_mlp_out")
    }
    with torch.no_grad():
        _, cache = model.run_with_cache(calib, names_filter=lambda n: n in names, return_type=None)
    transcoders = {}
    for layer in range(spec.n_layers):
        x = cache[f"blocks.{layer}.mlp.hook_in"][:, 1:].reshape(-1, spec.d_model)
        y = cache[f"blocks.{layer}.hook_mlp_out"][:, 1:].reshape(-1, spec.d_model)
        transcoders[layer] = _fit_transcoder(layer, x, y, spec, gen).to(dtype)
    del cache
    if dtype != torch.float32:
        model = model.to(dtype)
        model.cfg.dtype = dtype
    return model, transcoders
