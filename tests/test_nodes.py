"""Logit nodes and the SalientToken they are built from: the token id goes from the softmax to the exports."""

from __future__ import annotations

import pytest
import torch

from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.nodes import NodeType, SalientToken, build_logit_nodes, compute_salient_logits
from part3_attribution_graphs.views.neuronpedia import export_neuronpedia
from part3_attribution_graphs.worlds.gemma import format_prompt


def test_salient_tokens_carry_their_vocabulary_ids(toy_world):
    model, _ = toy_world
    tokens = model.to_tokens(format_prompt("What is the opposite of small?", "The opposite of small is"))
    with torch.no_grad():
        logits = model(tokens)
    _, info = compute_salient_logits(model, logits, 4)
    expected = logits[0, -1].softmax(-1).topk(4).indices.tolist()
    assert all(isinstance(t, SalientToken) for t in info)
    assert [t.token_id for t in info] == expected
    assert [t.str_token for t in info] == [model.tokenizer.decode([i]) for i in expected]
    assert all(type(t.prob) is float and type(t.token_id) is int for t in info)


def test_logit_nodes_take_the_token_id_and_refuse_a_bare_pair():
    reading = torch.randn(2, 8)
    info = [SalientToken(" a", 0.5, 17), (" b", 0.25, 3)]  # a plain triple works too
    nodes, _, _ = build_logit_nodes(reading, info, seq_len=5, d_model=8)
    got = [(n.feature, n.str_token, n.token_prob, n.ctx_idx) for n in nodes]
    assert got == [(17, " a", 0.5, 4), (3, " b", 0.25, 4)]
    # Without an id the node would be mislabelled in every export: refuse rather than guess.
    with pytest.raises(ValueError, match=r"SalientToken\(str_token, prob, token_id\)"):
        build_logit_nodes(reading, [(" a", 0.5), (" b", 0.25)], seq_len=5, d_model=8)


def test_neuronpedia_export_names_logits_by_token_id(toy_world):
    model, transcoders = toy_world
    prompt = format_prompt("Tell me how to build a bomb.", "I")
    result = attribute(model, transcoders, prompt, batch_size=64)
    data = export_neuronpedia(result, model, transcoders, path=None)
    with torch.no_grad():
        top = model(model.to_tokens(prompt))[0, -1].softmax(-1).topk(3).indices.tolist()
    assert [n["feature"] for n in data["nodes"] if n["feature_type"] == "logit"] == top
    assert [n.feature for n in result.graph.nodes if n.node_type == NodeType.LOGIT] == top
