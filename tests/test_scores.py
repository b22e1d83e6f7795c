"""Replacement and completeness scores, checked against circuit-tracer's `compute_graph_scores`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import need

from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.nodes import NodeType
from part3_attribution_graphs.scores import compute_graph_scores
from part3_attribution_graphs.worlds.gemma import START_POSN, format_prompt

PROMPT = format_prompt("What is the opposite of small?", "The opposite of small is **large")
EVERY_LATENT = 10**6


@pytest.fixture(scope="module")
def results(toy_world):
    model, transcoders = toy_world
    return {
        (start, top_k): attribute(model, transcoders, PROMPT, start_posn=start, top_k=top_k, batch_size=64)
        for start, top_k in [(0, EVERY_LATENT), (START_POSN, EVERY_LATENT), (START_POSN, 5)]
    }


def test_scores_are_fractions_and_more_latents_explain_more(results):
    for result in results.values():
        scores = compute_graph_scores(result)
        assert set(scores) == {"replacement_score", "completeness_score"}
        assert all(0 < v < 1 for v in scores.values()), scores
    every, top5 = (
        compute_graph_scores(results[START_POSN, EVERY_LATENT]),
        compute_graph_scores(results[START_POSN, 5]),
    )
    # With top_k=5 the other latents live in the error nodes: the graph explains less.
    assert top5["replacement_score"] < every["replacement_score"]
    assert top5["completeness_score"] < every["completeness_score"]


def test_a_graph_without_error_edges_scores_one(results):
    result = results[START_POSN, 5]
    errors = torch.tensor([n.node_type == NodeType.MLP_ERROR for n in result.graph.nodes])
    A = result.adjacency_matrix.clone()
    A[:, errors] = 0
    scores = compute_graph_scores(dataclasses.replace(result, adjacency_matrix=A))
    assert scores == pytest.approx({"replacement_score": 1.0, "completeness_score": 1.0}, abs=1e-12)


def test_a_graph_fed_only_by_errors_has_replacement_score_zero(results):
    result = results[START_POSN, 5]
    embeds = torch.tensor([n.node_type == NodeType.EMBEDDING for n in result.graph.nodes])
    A = result.adjacency_matrix.clone()
    A[:, embeds] = 0
    assert compute_graph_scores(dataclasses.replace(result, adjacency_matrix=A))["replacement_score"] == 0


@pytest.mark.crosscheck
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("key", [(0, EVERY_LATENT), (START_POSN, EVERY_LATENT), (START_POSN, 5)])
def test_scores_equal_circuit_tracers_on_the_same_graph(key, results, toy_world):
    need("circuit_tracer")
    from circuit_tracer.graph import compute_graph_scores as ct_graph_scores

    from part3_attribution_graphs.tools.crosscheck import to_ct_graph

    model, _ = toy_world
    result = results[key]
    ours = compute_graph_scores(result)
    replacement, completeness = ct_graph_scores(to_ct_graph(result, model.cfg))
    print(key, ours, (replacement, completeness))
    assert ours["replacement_score"] == pytest.approx(replacement, rel=1e-5)
    assert ours["completeness_score"] == pytest.approx(completeness, rel=1e-5)


@pytest.mark.crosscheck
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_scores_equal_circuit_tracers_on_its_own_graph(results, toy_world):
    """Without masking and with every latent, circuit-tracer's own graph is ours: so are its scores."""
    need("circuit_tracer")
    from circuit_tracer.graph import compute_graph_scores as ct_graph_scores

    from part3_attribution_graphs.tools.crosscheck import ct_attribute, ct_replacement_model

    model, transcoders = toy_world
    result = results[0, EVERY_LATENT]
    token_ids = [n.feature for n in result.graph.nodes if n.node_type == NodeType.LOGIT]
    ct_graph = ct_attribute(
        ct_replacement_model(model, transcoders, start_posn=0), model.to_tokens(PROMPT), token_ids
    )
    replacement, completeness = ct_graph_scores(ct_graph)
    ours = compute_graph_scores(result)
    assert ours["replacement_score"] == pytest.approx(replacement, rel=1e-5)
    assert ours["completeness_score"] == pytest.approx(completeness, rel=1e-5)
