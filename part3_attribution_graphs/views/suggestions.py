"""Latents that could be one supernode: their decoder directions agree, or their top examples peak on the
same tokens. The dashboard offers them as suggested groups ("suggest supernodes")."""

from __future__ import annotations

import torch

__all__ = ["MIN_COSINE", "MIN_OVERLAP", "similar_latents"]

MIN_COSINE = 0.5  # decoder directions at least this aligned write (mostly) the same thing
MIN_OVERLAP = 0.5  # Jaccard overlap of the tokens two latents' top examples peak on


@torch.no_grad()
def similar_latents(
    latents: list[tuple[int, int]],
    transcoders: dict | None,
    peaks: dict[tuple[int, int], set[str]] | None = None,
) -> list[tuple[tuple[int, int], tuple[int, int], float, str]]:
    """Pairs `(a, b, score, why)` of distinct `(layer, latent)`s: `why` is "decoder" (score: the cosine of
    `W_dec[f]` rows, across layers too, as every layer writes to the same residual stream) or "examples"
    (score: the overlap of their top examples' peak tokens)."""
    pairs: dict[tuple, tuple[float, str]] = {}
    if transcoders is not None and len(latents) > 1:
        rows = torch.stack([transcoders[layer].W_dec[f].detach().float().cpu() for layer, f in latents])
        rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
        cos = rows @ rows.T
        for a, b in torch.nonzero(torch.triu(cos, diagonal=1) >= MIN_COSINE).tolist():
            pairs[latents[a], latents[b]] = (float(cos[a, b]), "decoder")
    for i, a in enumerate(latents):
        for b in latents[i + 1 :]:
            pa, pb = (peaks or {}).get(a), (peaks or {}).get(b)
            if pa and pb and (a, b) not in pairs:
                overlap = len(pa & pb) / len(pa | pb)
                if overlap >= MIN_OVERLAP:
                    pairs[a, b] = (overlap, "examples")
    return [(a, b, score, why) for (a, b), (score, why) in sorted(pairs.items())]
