"""AttributionResult: every field is there, it survives save/load exactly, and `prune` re-prunes without
backward passes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from part3_attribution_graphs import attribution
from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.result import FORMAT_VERSION, AttributionResult, prune
from part3_attribution_graphs.scores import compute_graph_scores
from part3_attribution_graphs.worlds.gemma import START_POSN, format_prompt

PROMPT = format_prompt("What is the opposite of small?", "The opposite of small is")


@pytest.fixture(scope="module")
def result(toy_world):
    model, transcoders = toy_world
    return attribute(model, transcoders, PROMPT, start_posn=START_POSN, top_k=4, batch_size=64)


def assert_same(a: AttributionResult, b: AttributionResult) -> None:
    for f in dataclasses.fields(AttributionResult):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "graph":
            assert x.nodes == y.nodes
            assert torch.equal(x.writing_vecs, y.writing_vecs) and torch.equal(x.reading_vecs, y.reading_vecs)
            assert x.node_range_dict == y.node_range_dict
            assert [type(k) for k in x.node_range_dict] == [type(k) for k in y.node_range_dict]
            assert (x.seq_len, x.n_layers) == (y.seq_len, y.n_layers)
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def test_every_field_is_required():
    required = [
        f.name
        for f in dataclasses.fields(AttributionResult)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    assert required == [f.name for f in dataclasses.fields(AttributionResult)]


def test_save_load_round_trip_is_exact(result, tmp_path):
    path = result.save(tmp_path / "sub" / "graph.pt")
    loaded = AttributionResult.load(path)
    assert_same(result, loaded)
    # Only plain data and tensors inside: the strict loader reads it, and nothing half-written is left.
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == FORMAT_VERSION
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]
    # A loaded result works everywhere a fresh one does.
    assert compute_graph_scores(loaded) == compute_graph_scores(result)
    assert_same(prune(loaded, 0.7, 0.9), prune(result, 0.7, 0.9))


def test_load_explains_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="result.save"):
        AttributionResult.load(tmp_path / "missing.pt")
    torch.save({"adjacency_matrix": torch.zeros(2, 2)}, tmp_path / "old.pt")  # the pre-save/load CLI output
    with pytest.raises(ValueError, match="not a saved AttributionResult"):
        AttributionResult.load(tmp_path / "old.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="not a saved attribution result"):
        AttributionResult.load(tmp_path / "text.pt")


def test_load_refuses_newer_format(result, tmp_path):
    path = result.save(tmp_path / "graph.pt")
    raw = torch.load(path, weights_only=True)
    raw["version"] = FORMAT_VERSION + 1
    torch.save(raw, path)
    with pytest.raises(ValueError, match="format version"):
        AttributionResult.load(path)


def test_prune_matches_attribute_at_those_thresholds_without_backward_passes(toy_world, result, monkeypatch):
    model, transcoders = toy_world
    fresh = attribute(
        model,
        transcoders,
        PROMPT,
        start_posn=START_POSN,
        top_k=4,
        batch_size=64,
        node_threshold=0.6,
        edge_threshold=0.7,
    )

    def no_backward(*args, **kwargs):
        raise AssertionError("prune ran a backward pass")

    monkeypatch.setattr(attribution, "compute_adjacency_matrix", no_backward)
    before = result.kept_indices.clone()
    again = prune(
        result, np.float64(0.6), torch.tensor(0.7, dtype=torch.float64)
    )  # numpy and torch scalars are fine
    assert torch.equal(again.kept_indices, fresh.kept_indices)
    assert torch.equal(again.pruned_matrix, fresh.pruned_matrix)
    assert again.settings == fresh.settings
    assert isinstance(again.settings["node_threshold"], float)
    json.dumps(again.settings)  # stays JSON-serialisable for nodes.json
    assert torch.equal(result.kept_indices, before) and result.settings["node_threshold"] == 0.8  # untouched
    assert torch.equal(result.prune(0.6, 0.7).kept_indices, again.kept_indices)
    # A looser threshold keeps at least as many nodes.
    assert len(prune(result, 0.95, 0.95).kept_indices) >= len(result.kept_indices) >= len(again.kept_indices)


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, float("nan"), True, "0.8"])
def test_prune_rejects_thresholds_outside_the_unit_interval(result, bad):
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        prune(result, bad, 0.8)
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        prune(result, 0.8, bad)


def test_prune_takes_a_learners_pruning_function(result):
    calls = []

    def my_prune(A, w, n_layers, node_threshold, edge_threshold):
        calls.append((node_threshold, edge_threshold))
        kept = torch.arange(A.shape[0])
        return kept, A.clone()

    out = prune(result, 0.5, 0.5, prune_fn=my_prune)
    assert calls == [(0.5, 0.5)] and len(out.kept_indices) == len(result.graph)


def test_attribute_has_no_private_reuse_argument():
    import inspect

    assert not [p for p in inspect.signature(attribute).parameters if p.startswith("_")]
