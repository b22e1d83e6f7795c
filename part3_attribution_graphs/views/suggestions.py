"""Latents that could be one supernode: they fire on the same contexts of the example corpus.

A latent's recorded examples (GemmaScope 2's layout, `views/examples.py`) are the contexts, (sequence,
position) of the corpus, where it fires most. Two latents that carry one variable fire on the same
contexts: the land latents of Caldor all fire on Heddle, Inkle and Tansy wherever the corpus names them.
But latents are polysemantic, and the other contexts they record (".", "opposite", "What") are shared
by latents of every land: on the planted world an unweighted overlap recovers at most 5 of its 8 lands
from all its land latents (at any threshold from 0.1 to 0.5), and the decoder cosine (0.5-0.7 between
latents of different lands) joins them. So each context is weighted by how rare it is among the
recorded examples: `1 / n`, where `n` is the number of latents that record it, over all the example
data given (a context is the same sequence and position in any layer's data, also where each layer holds
its own subset of the corpus; on a subset load only the loaded latents count). The score of a pair is
the weighted Jaccard overlap of their contexts,

    shared(a, b) = w(C_a & C_b) / w(C_a | C_b),   w(S) = sum over contexts c in S of 1 / n_c,

and a pair with `shared >= MIN_SHARED` is offered. `MIN_SHARED = 0.25` is what two latents reach when
2/5 of each one's (weighted) contexts are common ones, `0.4 / (2 - 0.4)`: one meaning shared, the rest
of each their own. It was set after a sweep on the planted world (from all its land latents, 0.25-0.3
recover every land, 0.2 seven of 8, 0.15 three, 0.4 five); no land truth enters the rule. Latents
of layers without example data fall back on their decoder directions (cosine at least `MIN_COSINE`),
as before.

The dashboard joins the offered pairs transitively ("suggest supernodes"; `suggested_groups` does the
same in Python); `recovered_groups` scores suggestions against known groups (the planted world's lands).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..checks import as_count
from ..guard import guarded
from .examples import feature_row

__all__ = [
    "MIN_COSINE",
    "MIN_SHARED",
    "MIN_PURITY",
    "MIN_COVERAGE",
    "similar_latents",
    "suggested_groups",
    "group_scores",
    "recovered_groups",
]

MIN_COSINE = 0.5  # latents without examples: decoder directions at least this aligned write the same thing
MIN_SHARED = 0.25  # weighted Jaccard overlap of two latents' recorded contexts (see the module docstring)
MIN_PURITY = 0.8  # a known group is recovered by a suggestion at least this share of which is its ...
MIN_COVERAGE = 0.5  # ... and that holds at least this share of its latents (and two or more latents)

Latent = tuple[int, int]  # (layer, latent)


def _row_ids(example_data_by_layer: Mapping[int, dict]) -> tuple[dict[int, Int[Tensor, " n_seq"]], int]:
    """`({layer: an id per corpus row}, width)`: rows with the same tokens get the same id in every layer, so
    that `row_id * width + pos` names one context across layers even where each layer's data holds its own
    subset of the corpus (a subset load of hub example data)."""
    corpora = {layer: data["tokens"].long() for layer, data in example_data_by_layer.items()}
    width = max((t.shape[1] for t in corpora.values()), default=1)
    padded = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in corpora.values()]
    if not padded or not sum(len(t) for t in padded):
        return {layer: torch.zeros(len(t), dtype=torch.long) for layer, t in corpora.items()}, width
    _, ids = torch.unique(torch.cat(padded), dim=0, return_inverse=True)
    return dict(zip(corpora, ids.split([len(t) for t in padded]))), width


def _contexts_of_rows(
    data: dict, row_ids: Int[Tensor, " n_seq"], width: int
) -> Int[Tensor, "n_latents n_examples"]:
    """Context ids of every recorded example of every row of one layer's data; -1 where none is recorded."""
    corpus = data["tokens"]
    seq, pos = data["seq_ids"].long(), data["positions"].long()
    valid = (data["activations"] > 0) & (seq >= 0) & (seq < corpus.shape[0])
    valid &= (pos >= 0) & (pos < corpus.shape[1])
    rows = row_ids[seq.clamp(0, max(len(row_ids) - 1, 0))] if len(row_ids) else seq
    return torch.where(valid, rows * width + pos, -1)


def _recorded_contexts(
    example_data_by_layer: Mapping[int, dict], latents: Iterable[Latent]
) -> tuple[dict[Latent, Int[Tensor, " n"]], tuple[Int[Tensor, " m"], Int[Tensor, " m"]]]:
    """`({(layer, latent): its recorded context ids}, (context ids, latents recording each))`: the first
    for the given latents that have examples, the second (ids sorted) over every latent the example data
    records."""
    row_ids, width = _row_ids(example_data_by_layer)
    rows = {layer: _contexts_of_rows(d, row_ids[layer], width) for layer, d in example_data_by_layer.items()}
    every = torch.cat([ids[ids >= 0] for ids in rows.values()]) if rows else torch.zeros(0, dtype=torch.long)
    counts = torch.unique(every, return_counts=True)
    out = {}
    for layer, f in latents:
        if layer not in rows:
            continue
        row = feature_row(example_data_by_layer[layer], f)
        if row is not None:
            ids = rows[layer][row]
            if (ids >= 0).any():
                out[layer, f] = torch.unique(ids[ids >= 0])
    return out, counts


def _shared_contexts(
    contexts: Mapping[Latent, Int[Tensor, " n"]], counts: tuple[Int[Tensor, " m"], Int[Tensor, " m"]]
) -> tuple[list[Latent], Float[Tensor, "k k"]]:
    """`(keys, shared)`: the weighted Jaccard overlap of every pair of the latents' contexts (the module
    docstring's `shared`), as a sparse product, a few latents at a time."""
    keys = sorted(contexts)
    if not keys:
        return keys, torch.zeros(0, 0)
    every = torch.cat([contexts[k] for k in keys])
    columns, where = torch.unique(every, return_inverse=True)
    ids, n = counts
    weight = 1.0 / n[torch.searchsorted(ids, columns)].double()  # each context is among `ids`
    row = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor([len(contexts[k]) for k in keys]))
    weighted = torch.sparse_coo_tensor(
        torch.stack([row, where]), weight[where], (len(keys), len(columns)), check_invariants=True
    ).coalesce()
    both = torch.zeros(len(keys), len(keys), dtype=torch.float64)  # w(C_a & C_b)
    step = max(1, min(256, (1 << 22) // len(columns)))  # the other side dense, (contexts, step): <= 32 MiB
    for lo in range(0, len(keys), step):
        part = (row >= lo) & (row < lo + step)
        ones = torch.zeros(len(columns), min(step, len(keys) - lo), dtype=torch.float64)
        ones[where[part], row[part] - lo] = 1.0
        both[:, lo : lo + step] = torch.sparse.mm(weighted, ones)
    total = both.diagonal()
    either = total[:, None] + total[None, :] - both  # w(C_a | C_b)
    return keys, (both / either.clamp(min=1e-30)).float()


def _similar_args(a: dict) -> None:
    latents = a["latents"]
    if isinstance(latents, (str, bytes, Mapping)) or not hasattr(latents, "__iter__"):
        raise TypeError("latents must be a list of (layer, latent) pairs.")
    checked = []
    for i, item in enumerate(latents):
        if isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) != 2:
            raise ValueError(f"latents[{i}] = {item!r}: each latent is a (layer, latent) pair.")
        checked.append((as_count(f"latents[{i}] layer", item[0]), as_count(f"latents[{i}] latent", item[1])))
    a["latents"] = checked
    tcs, examples = a["transcoders"], a["example_data_by_layer"]
    for name, value in (("transcoders", tcs), ("example_data_by_layer", examples)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a {{layer: ...}} dict or None, got {type(value).__name__}.")
    for layer, f in checked:
        if tcs is not None and layer in tcs and not f < tcs[layer].W_dec.shape[0]:
            raise ValueError(
                f"latent ({layer}, {f}) is out of range: layer {layer}'s transcoder has "
                f"{tcs[layer].W_dec.shape[0]} latents."
            )
    for layer, data in (examples or {}).items():
        missing = {"activations", "seq_ids", "positions", "tokens"} - set(data)
        if missing:
            raise ValueError(
                f"example_data_by_layer[{layer}] lacks {sorted(missing)}: pass example data in GemmaScope "
                "2's layout (utils.load_example_data_parallel, or utils.make_toy_example_data offline)."
            )


@guarded(check=_similar_args)
@torch.no_grad()
def similar_latents(
    latents: list[Latent],
    transcoders: dict | None,
    example_data_by_layer: dict[int, dict] | None = None,
) -> list[tuple[Latent, Latent, float, str]]:
    """Pairs `(a, b, score, why)` of distinct `(layer, latent)`s that could be one supernode: `why` is
    "contexts" (score: the weighted overlap of the contexts they fire on, at least `MIN_SHARED`; see the
    module docstring) when both have recorded examples, or "decoder" when neither layer has example data
    (score: the cosine of their `W_dec` rows, at least `MIN_COSINE`; across layers too, as every layer
    writes to the same residual stream). A latent whose layer has example data but that recorded none is
    in no pair."""
    latents = list(dict.fromkeys(latents))
    contexts, counts = _recorded_contexts(example_data_by_layer or {}, latents)
    pairs: dict[tuple[Latent, Latent], tuple[float, str]] = {}
    keys, shared = _shared_contexts(contexts, counts)
    for i, j in torch.nonzero(torch.triu(shared >= MIN_SHARED, diagonal=1)).tolist():
        pairs[tuple(sorted((keys[i], keys[j])))] = (float(shared[i, j]), "contexts")
    # A latent of a layer with example data that recorded nothing never fired on the corpus: no evidence,
    # no suggestion (on Gemma 3 270M's random corpus, decoders would join 166 of 302 panel latents).
    bare = [x for x in latents if x[0] not in (example_data_by_layer or {})]
    known = [x for x in bare if transcoders is not None and x[0] in transcoders]
    if len(known) > 1:
        rows = torch.stack([transcoders[layer].W_dec[f].detach().float().cpu() for layer, f in known])
        rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
        cos = rows @ rows.T
        for a, b in torch.nonzero(torch.triu(cos, diagonal=1) >= MIN_COSINE).tolist():
            pairs[tuple(sorted((known[a], known[b])))] = (float(cos[a, b]), "decoder")
    return [(a, b, score, why) for (a, b), (score, why) in sorted(pairs.items())]


def suggested_groups(latents: list[Latent], pairs: list[tuple]) -> list[set[Latent]]:
    """The groups the dashboard suggests from `similar_latents` pairs: latents joined transitively (a
    latent no pair names is a group of its own), in the order of their first member."""
    parent = {x: x for x in latents}

    def root(x: Latent) -> Latent:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b, *_ in pairs:
        if a in parent and b in parent:
            parent[root(b)] = root(a)
    groups: dict[Latent, set[Latent]] = {}
    for x in latents:
        groups.setdefault(root(x), set()).add(x)
    return list(groups.values())


def group_scores(
    truth: dict[str, list[Latent]],
    groups: list[set[Latent]],
    kin: dict[str, list[Latent]] | None = None,
) -> dict[str, tuple[float, float]]:
    """For each known group, `(purity, coverage)` of its best suggested group of two or more latents: the
    share of that group's members that are the known group's (or its `kin`: latents of the same concept
    elsewhere, such as a land's latents at other sites, which do not make a suggestion impure), and the
    share of the known group's latents in it. Best: at least `MIN_PURITY` pure if any is, then holding the
    most, then the purer; `(0.0, 0.0)` if no such group holds any of its latents."""
    out = {}
    for name, members in truth.items():
        members = set(members)
        own = members | set((kin or {}).get(name, ()))
        best = (False, 0, 0.0)
        for g in groups:
            if len(g) >= 2 and g & members:
                purity = len(g & own) / len(g)
                best = max(best, (purity >= MIN_PURITY, len(g & members), purity))
        out[name] = (best[2], best[1] / len(members) if members else 0.0)
    return out


def recovered_groups(
    truth: dict[str, list[Latent]],
    groups: list[set[Latent]],
    kin: dict[str, list[Latent]] | None = None,
) -> dict[str, bool]:
    """For each known group, whether the suggestions recover it: a suggested group of two or more latents,
    at least `MIN_PURITY` of it the known group's (or its `kin`'s), holds at least `MIN_COVERAGE` of the
    known group."""
    return {
        name: purity >= MIN_PURITY and coverage >= MIN_COVERAGE
        for name, (purity, coverage) in group_scores(truth, groups, kin).items()
    }
