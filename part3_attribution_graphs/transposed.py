"""The backward pass of the frozen replacement model, written out as matrix products (no autograd).

With attention patterns and norm scales frozen and each MLP's gradient routed through its
transcoder's skip, the map from the write points to the read points is linear, and its transpose is
short: per layer, one product with `W_skip` for the MLP, and per key-value head one product with
`W_O`, one mixing of positions by the (frozen) pattern and one product with `W_V` for attention.
Every norm becomes a per-channel weight, folded into those matrices once, and a per-position
scale, folded into the mixing matrices. This is what autograd computes through the hooked model in
`setup_attribution`, without the graph walk, the batched-gradient copies and the elementwise
norm backward on every (target, position, channel).

It also skips work autograd cannot know is zero: a batch's gradients are computed only at
positions up to its last target's (attention looks back, never ahead) and only below its highest
target's layer.

`TransposedModel.supports(model)` says whether a model has the block layout written out here
(TransformerLens' pre-norm blocks with RMS norms, optionally Gemma's post-norms, attention then
MLP); `compute_adjacency_matrix` falls back to autograd otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer
from torch import Tensor

from .replacement import FreezeHooks, Transcoder

__all__ = ["TransposedModel"]


class TransposedModel:
    """The transposed Jacobian of one prompt's frozen replacement model, from write points to read points."""

    def __init__(self, model: HookedSAETransformer, transcoders: dict[int, Transcoder], freeze: FreezeHooks):
        cfg = model.cfg
        frozen = freeze.frozen_values
        self.n_layers = cfg.n_layers
        dtype = next(model.parameters()).dtype

        def scale(name: str) -> Tensor:  # (seq, 1): the frozen RMS of each position
            return frozen[name][0].to(dtype)

        def weight(module) -> Tensor | None:  # per-channel norm weight; RMSPre norms have none
            w = getattr(module, "w", None)
            return None if w is None else w.detach().to(dtype)

        def times(w: Tensor | None, x: Tensor) -> Tensor:
            return x if w is None else w * x

        self.layers = []
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            n_heads = cfg.n_heads
            n_kv = getattr(attn, "_W_V", attn.W_V).shape[0]
            rep = n_heads // n_kv
            W_O = attn.W_O.detach().to(dtype)  # (head, d_head, d_model)
            W_V = getattr(attn, "_W_V", attn.W_V).detach().to(dtype)  # (kv head, d_model, d_head)
            post = cfg.use_normalization_before_and_after
            # Gradient at z = (g_mid * w_post / s_post) @ W_O^T: w_post goes into W_O, 1 / s_post into the
            # mixing.
            w_post = weight(block.ln1_post) if post else None
            W_O = times(w_post, W_O)
            # Gradient at resid_pre += (g_v @ W_V^T) * w1 / s1: w1 goes into W_V, 1 / s1 into the mixing.
            w1 = weight(block.ln1)
            W_V = W_V if w1 is None else W_V * w1[:, None]
            s1 = scale(f"blocks.{layer}.ln1.hook_scale")
            pattern = frozen[f"blocks.{layer}.attn.hook_pattern"][0].to(dtype)  # (head, q, k)
            mix = pattern / s1.view(1, 1, -1)
            if post:
                mix = mix / scale(f"blocks.{layer}.ln1_post.hook_scale").view(1, -1, 1)
            seq = mix.shape[-1]
            groups = []
            for j in range(n_kv):
                heads = slice(j * rep, (j + 1) * rep)
                # (d_model, rep * d_head), columns (head in group, d_head): g_mid @ this = gradient at z.
                to_z = W_O[heads].permute(2, 0, 1).reshape(cfg.d_model, -1).contiguous()
                # (k, q * rep + r) = mix[head r of the group, q, k]: contracts (q, head) in one product.
                mix_t = mix[heads].permute(2, 1, 0).reshape(seq, -1).contiguous()
                groups.append((to_z, mix_t, W_V[j].T.contiguous()))  # W_V[j].T: (d_head, d_model)
            tc = transcoders[layer]
            W_skip = getattr(tc, "W_skip", None)
            # MLP: gradient at mlp_in = g @ W_skip (+ seeds); at resid_mid += that * (w2 / s2).
            ln2 = weight(block.ln2)
            n2 = (1 / scale(f"blocks.{layer}.ln2.hook_scale")).expand(-1, cfg.d_model)
            n2 = n2 * ln2 if ln2 is not None else n2.contiguous()
            self.layers.append((None if W_skip is None else W_skip.detach().to(dtype), n2, groups, rep))
        final = weight(model.ln_final)
        nf = (1 / scale("ln_final.hook_scale")).expand(-1, cfg.d_model)
        self.final = nf * final if final is not None else nf.contiguous()
        self.dtype = dtype

    @staticmethod
    def supports(model: HookedSAETransformer, freeze: FreezeHooks) -> bool:
        """Whether this model's blocks have the layout written out here (else use autograd)."""
        cfg = model.cfg
        if (
            cfg.normalization_type not in ("RMS", "RMSPre")
            or cfg.final_rms is False
            or cfg.parallel_attn_mlp
            or cfg.attn_only
            or cfg.original_architecture in ("Olmo2ForCausalLM", "Olmo3ForCausalLM")
        ):
            return False
        names = {"ln_final.hook_scale"}
        for layer in range(cfg.n_layers):
            names |= {
                f"blocks.{layer}.{n}" for n in ("ln1.hook_scale", "ln2.hook_scale", "attn.hook_pattern")
            }
            if cfg.use_normalization_before_and_after:
                names.add(f"blocks.{layer}.ln1_post.hook_scale")
        return names <= set(freeze.frozen_values)

    def gradients(
        self,
        reading: Float[Tensor, "batch d_model"],
        positions: Int[Tensor, " batch"],
        layers: list[int | str],
    ) -> Iterator[tuple[int | str, Float[Tensor, "batch pos d_model"]]]:
        """Each target's gradient at every write point below it, at positions `0 .. max(positions)`.

        Yields `(layer, grad at blocks.{layer}.hook_mlp_out)` from the top down, for the layers below the
        highest target (every layer if a logit is among the targets), then `("E", grad at
        blocks.0.hook_resid_pre)`. Positions after the last target's are left out: their gradients are
        zero. One layer's gradient is alive at a time, so memory does not grow with depth.
        """
        b = reading.shape[0]
        P = int(positions.max()) + 1  # the one wait for the device per batch
        reading = reading.to(self.dtype)
        device = reading.device
        # Which rows read where, from the Python list: no device round trip inside the layer loop.
        logit_rows = [i for i, layer in enumerate(layers) if layer == "L"]
        latent_rows: dict[int, list[int]] = {}
        for i, layer in enumerate(layers):
            if layer != "L":
                latent_rows.setdefault(int(layer), []).append(i)
        top = self.n_layers - 1 if logit_rows else max(latent_rows)

        g = reading.new_zeros(b, P, reading.shape[1])
        if logit_rows:  # logits read ln_final's output: the seed enters at the last resid_post
            i = torch.tensor(logit_rows, device=device)
            g[i, positions[i]] = reading[i] * self.final[positions[i]]
        live = bool(logit_rows)  # g is still all zero above the first latent target
        for layer in range(top, -1, -1):
            W_skip, n2, groups, rep = self.layers[layer]
            if live:
                yield layer, g
            h = g @ W_skip if live and W_skip is not None else torch.zeros_like(g)
            if layer in latent_rows:  # latent targets read this layer's mlp_in: their seeds enter here
                i = torch.tensor(latent_rows[layer], device=device)
                h.index_put_((i, positions[i]), reading[i], accumulate=True)
                live = True
            if not live:
                continue
            g = torch.addcmul(g, h, n2[:P])  # resid_mid
            g_pre = g
            for to_z, mix_t, v_out in groups:
                gz = (g @ to_z).view(b, P * rep, -1)  # (b, q * rep + r, d_head)
                gv = torch.matmul(mix_t[:P, : P * rep], gz)  # (b, k, d_head)
                g_pre = g_pre + gv @ v_out
            g = g_pre
        yield "E", g
