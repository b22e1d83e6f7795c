"""Latents that could be one supernode: their decoder directions agree, or their top examples peak on the
same tokens. The dashboard offers them as suggested groups ("suggest supernodes"), joining the pairs
transitively (`suggested_groups` does the same in Python); `recovered_groups` counts how many known
groups (e.g. the planted world's lands) come out as one suggestion each."""

from __future__ import annotations

import torch

__all__ = ["MIN_COSINE", "MIN_OVERLAP", "similar_latents", "suggested_groups", "recovered_groups"]

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


def suggested_groups(latents: list[tuple[int, int]], pairs: list[tuple]) -> list[set[tuple[int, int]]]:
    """The groups the dashboard suggests from `similar_latents` pairs: latents joined transitively (a
    latent no pair names is a group of its own), in the order of their first member."""
    parent = {x: x for x in latents}

    def root(x: tuple[int, int]) -> tuple[int, int]:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b, *_ in pairs:
        if a in parent and b in parent:
            parent[root(b)] = root(a)
    groups: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for x in latents:
        groups.setdefault(root(x), set()).add(x)
    return list(groups.values())


def recovered_groups(
    truth: dict[str, list[tuple[int, int]]], groups: list[set[tuple[int, int]]]
) -> dict[str, bool]:
    """For each known group, whether the suggestions recover it: one suggested group holds all its
    latents and nothing else."""
    return {name: any(g == set(members) for g in groups) for name, members in truth.items()}
