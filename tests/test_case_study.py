"""The case study's tools: the strongest path is the best of all paths (checked by enumerating them), a
swap with a prompt's own values changes nothing, and the contrast finds land latents only where the land
can be known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from part3_attribution_graphs.case_study import path_shares, strongest_path, swap_group
from part3_attribution_graphs.interventions import intervene
from part3_attribution_graphs.nodes import GraphNodes, NodeInfo, NodeType
from part3_attribution_graphs.worlds.gemma import format_prompt


def random_pruned_graph(seed: int) -> SimpleNamespace:
    """3 embeddings, two layers of 3 latents and an error node each, 2 logits; random signed edges, some
    missing, always forward in node order (as in a real graph); 12 nodes kept of 14."""
    gen = torch.Generator().manual_seed(seed)
    E, L, R, G = NodeType.EMBEDDING, NodeType.LATENT, NodeType.MLP_ERROR, NodeType.LOGIT
    nodes = [NodeInfo(E, "E", p, p) for p in range(3)]
    for layer in range(2):
        nodes += [NodeInfo(L, layer, p, 5 + p, activation=1.0) for p in range(3)] + [NodeInfo(R, layer, 2, 0)]
    nodes += [NodeInfo(G, "L", 2, 50), NodeInfo(G, "L", 2, 51)]
    kept = torch.tensor([i for i in range(len(nodes)) if i not in (4, 9)])  # a latent of each layer pruned
    n = len(kept)
    kinds = [nodes[i].node_type for i in kept.tolist()]
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = A * (torch.rand(n, n, generator=gen) < 0.6)
    A = torch.tril(A, -1)
    for t, kt in enumerate(kinds):  # embeddings and error nodes read nothing; logits are read by nothing
        for s, ks in enumerate(kinds):
            if (
                kt in (E, R)
                or ks == G
                or (kt == L and ks == L and nodes[kept[t]].layer == nodes[kept[s]].layer)
            ):
                A[t, s] = 0
    return SimpleNamespace(
        graph=GraphNodes(nodes=nodes, seq_len=3, n_layers=2), kept_indices=kept, pruned_matrix=A
    )


def all_paths(result) -> list[list[int]]:
    """Every path from an embedding to the top logit through at least one latent (global indices)."""
    kept = result.kept_indices.tolist()
    kinds = [result.graph.nodes[i].node_type for i in kept]
    A = result.pruned_matrix
    end = kinds.index(NodeType.LOGIT)
    found = []

    def walk(path: list[int]) -> None:
        t = path[-1]
        if t == end:
            if len(path) > 2:
                found.append([kept[k] for k in path])
            return
        for nxt in range(t + 1, len(kept)):
            if A[nxt, t] != 0 and not (kinds[nxt] == NodeType.LOGIT and kinds[t] == NodeType.EMBEDDING):
                walk(path + [nxt])

    for s, kind in enumerate(kinds):
        if kind == NodeType.EMBEDDING:
            walk([s])
    return found


@pytest.mark.parametrize("seed", range(8))
def test_strongest_path_is_the_best_of_all_paths(seed):
    result = random_pruned_graph(seed)
    paths = all_paths(result)
    if not paths:
        with pytest.raises(ValueError, match="no path"):
            strongest_path(result)
        return
    best = max(math.prod(path_shares(result, p)) for p in paths)
    path, strength = strongest_path(result)
    assert path in paths
    assert strength == pytest.approx(best, rel=1e-12)
    assert math.prod(path_shares(result, path)) == pytest.approx(best, rel=1e-12)


def test_a_swap_with_its_own_values_changes_nothing(toy_world):
    model, tcs = toy_world
    prompt = format_prompt("opposite of small?", "large")
    other = format_prompt("opposite of large?", "small")
    clean_run = intervene(model, tcs, prompt, [])
    pos = int((model.to_tokens(prompt) != model.to_tokens(other))[0].nonzero()[0])  # "small" / "large"
    latents = [(layer, pos, int(clean_run.activations[layer][pos].argmax())) for layer in (1, 2)]
    clean = clean_run.logits[0, -1]
    torch.testing.assert_close(swap_group(model, tcs, prompt, prompt, latents), clean)
    assert not torch.allclose(swap_group(model, tcs, prompt, other, latents), clean)
    with pytest.raises(ValueError, match="same length"):
        swap_group(model, tcs, prompt, format_prompt("opposite of small?", "large large"), latents)


def test_land_latents_only_where_the_land_can_be_known():
    """Before the town the land is unknown, and every two-hop prompt reads the same tokens up to the town: no
    latent there may code for a land, whatever its rounding noise."""
    from part3_attribution_graphs.worlds.planted import (
        TOWN_POSN,
        land_latents,
        load_planted_world,
        planted_facts,
    )

    model, tcs = load_planted_world()
    facts = planted_facts("two_hop")
    found = land_latents(model, tcs, facts)
    assert model.to_str_tokens(facts[0].prompt)[TOWN_POSN] == facts[0].entity
    positions = {pos for latents in found.values() for _, pos, _ in latents}
    assert positions and min(positions) >= TOWN_POSN
