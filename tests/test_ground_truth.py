"""The ground-truth benchmark (`tools.ground_truth`) on a shortened run: its definitions and its figures.

The full run (`make ground-truth`) is a benchmark, not a test: its numbers are the README's table.
"""

from __future__ import annotations

import math

import torch

from part3_attribution_graphs.tools import ground_truth
from part3_attribution_graphs.worlds import planted


def test_pairs_and_controls_are_drawn_before_anything_is_measured():
    """Partners share the attribute and differ in land; the same seed gives the same pairs; the random
    control has as many latents, at the same sites, none of them a land latent."""
    facts = planted.planted_facts("two_hop")
    idx = [i for i, f in enumerate(facts) if f.split == "heldout"]
    pairs = ground_truth._pairs(facts, idx, 2, torch.Generator().manual_seed(3))
    assert pairs == ground_truth._pairs(facts, idx, 2, torch.Generator().manual_seed(3))
    assert len(pairs) == 2 * len(idx)
    for i, j in pairs:
        assert facts[i].attribute == facts[j].attribute and facts[i].intermediate != facts[j].intermediate
    latents = [(0, 4, 1), (0, 4, 2), (1, 9, 3)]
    rand = ground_truth._random_like(latents, set(latents), 256, torch.Generator().manual_seed(0))
    assert [(a, b) for a, b, _ in rand] == [(a, b) for a, b, _ in latents]
    assert not set(rand) & set(latents) and len(set(rand)) == 3


def test_shortened_run_gives_every_figure(planted_world):
    model, transcoders = planted_world
    out = ground_truth.measure(model, transcoders, n_pairs=1, n_graphs=2, sweep=False, n_prompts=4)
    row = out["rows"]["two_hop/heldout"]
    for what in ("swap", "ablation"):
        for kind in ground_truth.KINDS:
            for mode in ground_truth.MODES:
                rate, n = row[f"{what}/{kind}/{mode}"]
                assert n > 0 and 0.0 <= rate <= 1.0
    # The model's own variable moves the answer; a random subspace of the same size does not.
    assert row["land subspace"][0] > row["random subspace"][0]
    assert row["precision"][1] > 0 and row["enrichment"][1] == 2
    assert math.isclose(row["enrichment"][0], row["precision"][0] / row["base rate"][0])
    table = ground_truth.table(out)
    assert "whole site" in table and "enrichment" in table and "opposite" in table


def test_sweep_figure_draws_each_rate_against_the_threshold():
    fake = {
        x: {
            k: (x, 4)
            for k in (
                "swap/planted/frozen",
                "ablation/planted/frozen",
                "swap/random/frozen",
                "ablation/random/frozen",
            )
        }
        for x in (0.0, 0.1, 0.5)
    }
    fig = ground_truth.sweep_figure(fake)
    assert len(fig.data) == 4 and list(fig.data[0].x) == [0.0, 0.1, 0.5]
    assert list(fig.data[1].y) == [0.0, 10.0, 50.0]
