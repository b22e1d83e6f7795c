"""Careless input to `attribute`: every case that used to give a silently wrong graph or an obscure error.

Each test names the case from issue 12 it covers. The model must come out of a refused call clean (no hooks).
"""

from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import hook_count

from part3_attribution_graphs import attribution as attribution_module
from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.worlds.gemma import START_POSN, format_prompt

PROMPT = format_prompt("What is the opposite of small?", "The opposite of small is")


@pytest.fixture(scope="module")
def reference(toy_world):
    """The graph of PROMPT on a clean model, to compare every accepted variant against."""
    model, transcoders = toy_world
    return attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)


@pytest.fixture
def clean_toy(toy_world):
    """The toy world, checked free of hooks after the test (a refused call must not leave any)."""
    model, transcoders = toy_world
    assert hook_count(model) == 0
    yield model, transcoders
    leaked = hook_count(model)
    model.reset_hooks(including_permanent=True)
    assert leaked == 0, f"{leaked} hooks left on the model"


def _same_graph(result, reference) -> None:
    assert torch.equal(result.adjacency_matrix, reference.adjacency_matrix)
    assert torch.equal(result.kept_indices, reference.kept_indices)


# --- Silent wrong results -------------------------------------------------------------------------------


def test_1_prompt_longer_than_the_context_is_refused_naming_both_lengths(clean_toy):
    model, transcoders = clean_toy
    long_prompt = PROMPT + " big" * 200
    n_tokens = model.to_tokens(long_prompt, truncate=False).shape[1]
    assert n_tokens > model.cfg.n_ctx
    with pytest.raises(ValueError, match=rf"{n_tokens} tokens.*n_ctx={model.cfg.n_ctx}"):
        attribute(model, transcoders, long_prompt, start_posn=START_POSN)


@pytest.mark.parametrize("name", ["W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_2_nan_or_inf_in_a_transcoder_weight_is_named(clean_toy, name, bad):
    model, transcoders = clean_toy
    broken = dict(transcoders)
    broken[2] = copy.deepcopy(transcoders[2])
    getattr(broken[2], name).data.view(-1)[3] = bad
    with pytest.raises(ValueError, match=rf"transcoders\[2\]\.{name} has 1 NaN or inf"):
        attribute(model, broken, PROMPT, start_posn=START_POSN)


def test_2_a_weight_broken_after_a_successful_check_is_still_caught(clean_toy, reference):
    model, transcoders = clean_toy
    mine = {layer: copy.deepcopy(tc) for layer, tc in transcoders.items()}
    _same_graph(attribute(model, mine, PROMPT, start_posn=START_POSN, batch_size=64), reference)
    with torch.no_grad():
        mine[1].W_dec[0, 0] = float("nan")  # in place, after the weights were found finite once
    with pytest.raises(ValueError, match=r"transcoders\[1\]\.W_dec"):
        attribute(model, mine, PROMPT, start_posn=START_POSN)


@pytest.mark.parametrize("engine", ["compute_adjacency_matrix", "transposed_adjacency_matrix"])
def test_2_a_non_finite_adjacency_is_refused_before_pruning(clean_toy, monkeypatch, engine):
    """Whichever route `attribute` takes to the edges (autograd or the written-out backward)."""
    model, transcoders = clean_toy
    real = getattr(attribution_module, engine)

    def one_nan_edge(*args, **kwargs):  # what a NaN or an overflow anywhere in the model would produce
        adjacency = real(*args, **kwargs)
        adjacency[-1, 0] = float("nan")
        return adjacency

    monkeypatch.setattr(attribution_module, engine, one_nan_edge)
    if engine == "compute_adjacency_matrix":  # send attribute down the autograd route
        monkeypatch.setattr(attribution_module.TransposedModel, "supports", staticmethod(lambda *a: False))
    with pytest.raises(FloatingPointError, match="1 NaN or inf entries.*from node 0"):
        attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)


def test_3_a_transcoder_writing_to_another_layer_is_refused(clean_toy):
    model, transcoders = clean_toy
    broken = dict(transcoders)
    broken[1] = copy.deepcopy(transcoders[1])
    broken[1].cfg.metadata.hook_name_out = "blocks.2.hook_mlp_out"
    with pytest.raises(
        ValueError, match=r"transcoders\[1\] writes 'blocks.2.hook_mlp_out'.*'blocks.1.hook_mlp_out'"
    ):
        attribute(model, broken, PROMPT, start_posn=START_POSN)


def _my_hook(x, hook):
    return x


@pytest.mark.parametrize("kind", ["temporary", "permanent", "torch"])
def test_4_hooks_already_on_the_model_are_named_in_a_warning(clean_toy, kind):
    model, transcoders = clean_toy
    site = model.blocks[1].hook_mlp_out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "temporary":
            with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", _my_hook)]):
                attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)
        elif kind == "permanent":
            site.add_hook(_my_hook, is_permanent=True)
            attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)
            model.reset_hooks(including_permanent=True)
        else:
            handle = model.blocks[1].mlp.register_forward_hook(lambda module, args, out: out)
            attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)
            handle.remove()
    messages = [str(w.message) for w in caught if "hook" in str(w.message)]
    assert len(messages) == 1, messages
    expected = {
        "temporary": "blocks.1.hook_mlp_out: TransformerLens forward hook _my_hook",
        "permanent": "blocks.1.hook_mlp_out: TransformerLens permanent forward hook _my_hook",
        "torch": "blocks.1.mlp: torch forward hook",
    }[kind]
    assert expected in messages[0]
    assert "model.reset_hooks(including_permanent=True)" in messages[0] and ".remove()" in messages[0]


def test_4_a_clean_model_gets_no_hook_warning(clean_toy):
    model, transcoders = clean_toy
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*hook")
        attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)


def test_5_a_second_concurrent_call_on_one_model_is_refused(clean_toy, reference, monkeypatch):
    model, transcoders = clean_toy
    inside, go_on = threading.Event(), threading.Event()
    real = attribution_module.prune_graph

    def pause_first_call(*args, **kwargs):  # the first call waits here, hooks gone, lock held
        inside.set()
        assert go_on.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution_module, "prune_graph", pause_first_call)
    results = {}
    first = threading.Thread(
        target=lambda: results.setdefault(
            "first", attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)
        )
    )
    first.start()
    try:
        assert inside.wait(120)
        with pytest.raises(RuntimeError, match="already running on this model .*take turns"):
            attribute(model, transcoders, PROMPT, start_posn=START_POSN)
    finally:
        go_on.set()
        first.join(120)
    _same_graph(results["first"], reference)
    monkeypatch.setattr(attribution_module, "prune_graph", real)
    _same_graph(attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64), reference)


def test_5_racing_threads_get_the_right_graph_or_a_clear_refusal(clean_toy, reference):
    model, transcoders = clean_toy
    outcomes: list = []
    start = threading.Barrier(3)

    def run():
        start.wait()
        try:
            outcomes.append(attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64))
        except Exception as err:  # noqa: BLE001 - every failure is inspected below
            outcomes.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(outcomes) == 3
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            assert isinstance(outcome, RuntimeError) and "already running on this model" in str(outcome), (
                outcome
            )
        else:
            _same_graph(outcome, reference)
    assert any(not isinstance(o, Exception) for o in outcomes)


# --- Obscure errors made clear --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["start_posn", "top_k", "batch_size", "n_output_nodes"])
@pytest.mark.parametrize("value", [2.0, 2.5, True, "3"])
def test_counts_must_be_whole_numbers(clean_toy, name, value):
    model, transcoders = clean_toy
    with pytest.raises(TypeError, match=rf"{name} must be a whole number"):
        attribute(model, transcoders, PROMPT, **{name: value})


def test_negative_top_k_is_an_error(clean_toy):
    model, transcoders = clean_toy
    with pytest.raises(ValueError, match="top_k must be at least 0, got -1"):
        attribute(model, transcoders, PROMPT, top_k=-1)


def test_numpy_and_torch_integers_are_counts(clean_toy, reference):
    model, transcoders = clean_toy
    result = attribute(
        model,
        transcoders,
        PROMPT,
        start_posn=np.int64(START_POSN),
        top_k=torch.tensor(5),
        batch_size=np.int32(64),
        n_output_nodes=np.int16(3),
    )
    _same_graph(result, reference)
    assert all(type(v) in (int, float, type(None)) for v in result.settings.values())  # JSON-ready


@pytest.mark.parametrize(
    "make",
    [np.float32, np.float64, torch.tensor, lambda v: torch.tensor([v])],
    ids=["np.float32", "np.float64", "torch scalar", "torch 1-element"],
)
def test_thresholds_may_be_numpy_or_torch_scalars(clean_toy, reference, make):
    model, transcoders = clean_toy
    result = attribute(
        model,
        transcoders,
        PROMPT,
        start_posn=START_POSN,
        node_threshold=make(0.8),
        edge_threshold=make(0.85),
        batch_size=64,
    )
    _same_graph(result, reference)
    assert isinstance(result.settings["node_threshold"], float)


def test_a_list_of_transcoders_says_to_pass_a_dict(clean_toy):
    model, transcoders = clean_toy
    with pytest.raises(TypeError, match=r"dict \{layer: transcoder\}.*dict\(enumerate\(transcoders\)\)"):
        attribute(model, [transcoders[layer] for layer in sorted(transcoders)], PROMPT)


def test_attribute_works_inside_inference_mode(clean_toy, reference):
    model, transcoders = clean_toy
    with torch.inference_mode():
        result = attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)
    _same_graph(result, reference)
    assert not result.adjacency_matrix.is_inference()  # usable afterwards, outside inference mode


def test_a_deepcopied_model_is_refused_and_the_suggested_twin_works(clean_toy, reference):
    model, transcoders = clean_toy
    with pytest.raises(RuntimeError, match=r"blocks\.0\.mlp .*copy\.deepcopy"):
        attribute(copy.deepcopy(model), transcoders, PROMPT, start_posn=START_POSN)
    from sae_lens import HookedSAETransformer

    # The recipe the message gives.
    twin = HookedSAETransformer(model.cfg, model.tokenizer)
    twin.load_state_dict(model.state_dict())
    twin.set_use_hook_mlp_in(True)
    _same_graph(attribute(twin, transcoders, PROMPT, start_posn=START_POSN, batch_size=64), reference)


@pytest.mark.parametrize("prompt", [PROMPT.encode(), bytearray(PROMPT.encode())], ids=["bytes", "bytearray"])
def test_bytes_prompt_says_to_decode(clean_toy, prompt):
    model, transcoders = clean_toy
    with pytest.raises(TypeError, match=r"prompt is bytes.*decode\('utf-8'\)"):
        attribute(model, transcoders, prompt)
