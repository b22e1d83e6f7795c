"""An independent, explicit implementation of the linearised (local replacement) model.

This is the yardstick for the attribution code. It shares none of its code path: no hooks, no
backward passes. It rebuilds the residual stream position by position from the model's weights,
with every RMSNorm scale and attention pattern taken from the cache as a constant, and each MLP
replaced by `x @ W_skip.T + c`, where the constant `c` is whatever the MLP really added on top of the
skip (kept latents, `b_dec`, error). Its inputs are exactly where graph nodes write:

- `embeds` (seq, d_model): the residual stream entering layer 0;
- `mlp_consts[l]` (seq, d_model): the constant part of layer l's MLP output.

Because the model is linear in these inputs, an edge `A[t, s]` is the change in target t's reading
when source s's writing vector is added at its write point (`edge_by_perturbation`), and the value a
target reads is the sum of its edges plus the response to the biases (`read_values`).
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Float
from sae_lens import HookedSAETransformer
from torch import Tensor
from transformer_lens import ActivationCache

from .replacement import Transcoder

__all__ = ["LinearisedModel"]


def _skip64(tc: Transcoder, x: Tensor) -> Tensor:
    """`x @ W_skip.T` in float64, written out here rather than shared with the attribution code."""
    W_skip = getattr(tc, "W_skip", None)
    return x @ W_skip.detach().double().T if W_skip is not None else torch.zeros_like(x)


class LinearisedModel:
    """The frozen model of one prompt, as an explicit function of its node inputs (float64 inside)."""

    def __init__(
        self, model: HookedSAETransformer, transcoders: dict[int, Transcoder], cache: ActivationCache
    ):
        self.model, self.transcoders, self.cache = model, transcoders, cache
        self.n_layers = model.cfg.n_layers

    def _scale(self, name: str) -> Tensor:
        return self.cache[name][0].double()  # (seq, 1)

    def _norm_w(self, module) -> Tensor:
        return module.w.detach().double()

    def forward(
        self,
        embeds: Float[Tensor, "seq d_model"],
        mlp_consts: list[Tensor],
    ) -> dict[str, Tensor]:
        """Run the frozen model; returns every read point (`blocks.{l}.mlp.hook_in`, `unembed.hook_in`)."""
        out: dict[str, Tensor] = {}
        resid = embeds.double()
        for layer, block in enumerate(self.model.blocks):
            attn = block.attn
            x = resid / self._scale(f"blocks.{layer}.ln1.hook_scale") * self._norm_w(block.ln1)
            W_V = attn.W_V.detach().double()  # (n_heads, d_model, d_head), kv heads already repeated
            v = torch.einsum("pd,hde->phe", x, W_V) + attn.b_V.detach().double()
            pattern = self.cache[f"blocks.{layer}.attn.hook_pattern"][0].double()  # (head, q, k)
            z = torch.einsum("hqk,khe->qhe", pattern, v)
            attn_out = (
                einops.einsum(z, attn.W_O.detach().double(), "q h e, h e d -> q d")
                + attn.b_O.detach().double()
            )
            attn_out = (
                attn_out / self._scale(f"blocks.{layer}.ln1_post.hook_scale") * self._norm_w(block.ln1_post)
            )
            resid = resid + attn_out
            mlp_in = resid / self._scale(f"blocks.{layer}.ln2.hook_scale") * self._norm_w(block.ln2)
            out[f"blocks.{layer}.mlp.hook_in"] = mlp_in
            resid = resid + _skip64(self.transcoders[layer], mlp_in) + mlp_consts[layer].double()
        final = resid / self._scale("ln_final.hook_scale") * self._norm_w(self.model.ln_final)
        out["unembed.hook_in"] = final
        return out

    def clean_inputs(self) -> tuple[Tensor, list[Tensor]]:
        """The inputs that reproduce the cached forward pass: embeddings, and `mlp_out - skip` per layer."""
        embeds = self.cache["blocks.0.hook_resid_pre"][0].double()
        consts = []
        for layer in range(self.n_layers):
            x = self.cache[f"blocks.{layer}.mlp.hook_in"][0].double()
            consts.append(
                self.cache[f"blocks.{layer}.hook_mlp_out"][0].double() - _skip64(self.transcoders[layer], x)
            )
        return embeds, consts

    def zero_inputs(self) -> tuple[Tensor, list[Tensor]]:
        seq, d = self.cache["blocks.0.hook_resid_pre"].shape[1:]
        return torch.zeros(seq, d, dtype=torch.float64), [
            torch.zeros(seq, d, dtype=torch.float64) for _ in range(self.n_layers)
        ]

    def bias_inputs(self) -> tuple[Tensor, list[Tensor]]:
        """Inputs holding only the constants that are not graph nodes: each layer's `b_dec` at every position.

        (The model's own biases, zero in Gemma, act whatever the inputs, so they are included too.)
        """
        embeds, consts = self.zero_inputs()
        return embeds, [c + self.transcoders[layer].b_dec.detach().double() for layer, c in enumerate(consts)]

    def read_values(self, read_name: str, pos: int, reading: Tensor, bias_only: bool = False) -> float:
        """`r . value` at a read point, on the clean inputs or on the bias-only inputs."""
        embeds, consts = self.bias_inputs() if bias_only else self.clean_inputs()
        return float(self.forward(embeds, consts)[read_name][pos] @ reading.double())

    def edge_by_perturbation(
        self, write: tuple[str, int], writing: Tensor, read: tuple[str, int], reading: Tensor
    ) -> float:
        """Change in `reading . read point` when `writing` is added at `write` = ("E" | layer, pos).

        The model is affine, so a finite difference of size 1 from zero input is exact (up to float64).
        """
        embeds, consts = self.zero_inputs()
        name, read_pos = read
        # Affine, not linear (attention biases): measure the change from the all-zero input.
        base = self.forward(embeds, consts)[name][read_pos] @ reading.double()
        where, pos = write
        if where == "E":
            embeds[pos] += writing.double()
        else:
            consts[where][pos] += writing.double()
        return float(self.forward(embeds, consts)[name][read_pos] @ reading.double() - base)
