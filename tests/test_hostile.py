"""Hostile and careless input to every entry point (issue 21): each case ends in a clear error, a warning, or
the correct result, and the model comes out of it bit-identical, with no hook left.

Test names say the outcome they expect: `test_error_*` (a clear exception), `test_warning_*` (a warning that
names the cause, and the call still runs) and `test_correct_*` (the right result). The numbers in the section
headings are the rows of the issue.
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hook_count

import part3_attribution_graphs.tests as autograder
from part3_attribution_graphs import __main__ as cli
from part3_attribution_graphs import attribution, guard, interventions, solutions
from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.checks import ExistingHooksWarning
from part3_attribution_graphs.interventions import (
    ablation_effects,
    agreement,
    demeaned_logit,
    intervene,
    intervene_generate,
    most_influential_latents,
    predicted_effects,
    run_with_latent_set,
)
from part3_attribution_graphs.nodes import NodeType
from part3_attribution_graphs.result import AttributionResult
from part3_attribution_graphs.toy import make_toy_world
from part3_attribution_graphs.worlds.gemma import START_POSN, format_prompt

PROMPT = format_prompt("What is the opposite of small?", "The opposite of small is")
EDIT = (1, 5, 3, 0.0)


def _state(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def _put_back(model, state: dict[str, torch.Tensor], names: list[str]) -> None:
    buffers = dict(model.named_buffers())
    for name in names:
        owner, _, key = name.rpartition(".")
        module = model.get_submodule(owner)
        if name in buffers:
            module._buffers[key] = state[name].clone()
        else:
            with torch.no_grad():
                getattr(module, key).data = state[name].clone()


@pytest.fixture(scope="module")
def world(toy_world):
    return toy_world


@pytest.fixture(scope="module")
def pristine(world):
    """The toy model's parameters and buffers and a short prompt's logits, before any hostile call."""
    model, _ = world
    with torch.no_grad():
        return _state(model), model(model.to_tokens("The opposite of small is"))


@pytest.fixture(autouse=True)
def model_left_bit_identical(world, pristine):
    """Whatever a case does, the model ends as it began: same parameters and buffers (shapes and bits), no
    hooks, and the same logits for a short prompt."""
    model, _ = world
    yield
    state, logits = pristine
    now = _state(model)
    assert now.keys() == state.keys()
    changed = [k for k in state if now[k].shape != state[k].shape or not torch.equal(now[k], state[k])]
    leaked = hook_count(model)
    model.reset_hooks(including_permanent=True)
    _put_back(model, state, changed)  # so that one case's damage cannot fail the next
    assert not changed, f"the model changed: {changed[:6]}"
    assert leaked == 0, f"{leaked} hooks left on the model"
    with torch.no_grad():
        assert torch.equal(model(model.to_tokens("The opposite of small is")), logits)


@pytest.fixture(scope="module")
def graph(world):
    model, transcoders = world
    return attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)


@pytest.fixture(scope="module")
def other_graph():
    """A graph of the same prompt made in another toy world (same shapes, other weights)."""
    model, transcoders = make_toy_world(seed=1)
    return attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)


def _latents(res, n=2) -> list[int]:
    return [i for i, node in enumerate(res.graph.nodes) if node.node_type == NodeType.LATENT][:n]


# --- 1. A too-long input: refused before any forward pass, the model unchanged --------------------


def _long_ids(model, n=211):
    return torch.arange(n) % model.cfg.d_vocab


TOO_LONG = {
    "intervene, 211 token ids": lambda m, t: intervene(m, t, _long_ids(m), []),
    "intervene, text over n_ctx": lambda m, t: intervene(m, t, PROMPT + " big" * 200, [EDIT]),
    "intervene_generate, 211 token ids": lambda m, t: intervene_generate(m, t, _long_ids(m), []),
    "run_with_latent_set, 211 token ids": lambda m, t: run_with_latent_set(
        m, t[1], _long_ids(m).unsqueeze(0), 3, 5, 0.0
    ),
    "attribute, text over n_ctx": lambda m, t: attribute(m, t, PROMPT + " big" * 200, start_posn=START_POSN),
}


@pytest.mark.parametrize("case", TOO_LONG, ids=list(TOO_LONG))
def test_error_too_long_input_is_refused_before_the_model_runs(world, case):
    model, transcoders = world
    with pytest.raises(ValueError, match=r"tokens but the model's context holds n_ctx=128"):
        TOO_LONG[case](model, transcoders)


def test_error_generating_past_the_context_is_refused(world):
    model, transcoders = world
    prompt = _long_ids(model, 120)
    with pytest.raises(ValueError, match=r"plus max_new_tokens=9 has 129 tokens .*n_ctx=128"):
        intervene_generate(model, transcoders, prompt, [], max_new_tokens=9)


def test_error_a_million_new_tokens_is_refused_at_once(world, monkeypatch):
    model, transcoders = world
    calls = []
    real = interventions.intervene

    def counted(*args, **kwargs):  # stops the runaway loop of a generator that does not check
        calls.append(1)
        if len(calls) > 3:
            raise AssertionError("intervene_generate started generating a million tokens")
        return real(*args, **kwargs)

    monkeypatch.setattr(interventions, "intervene", counted)
    with pytest.raises(ValueError, match=r"max_new_tokens=1000000"):
        intervene_generate(model, transcoders, PROMPT, [], max_new_tokens=10**6)
    assert not calls


def test_correct_buffers_replaced_inside_a_failed_call_are_put_back(world):
    model, _ = world
    attn = model.blocks[0].attn
    before, keys = attn.rotary_sin, list(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"), guard.model_session(model, "test"):
        attn.register_buffer("rotary_sin", torch.zeros(211, before.shape[1]), persistent=False)
        raise RuntimeError("boom")
    assert attn.rotary_sin is before
    assert list(model.state_dict()) == keys, "the buffer came back, but no longer in state_dict"


# --- 2. Two threads on one model: the right answer or a clear refusal -----------------------------


def test_correct_or_refused_racing_threads_on_intervene(world):
    model, transcoders = world
    tokens = model.to_tokens(PROMPT)
    reference = intervene(model, transcoders, tokens, [EDIT]).logits
    outcomes: list = []
    start = threading.Barrier(4)

    def run():
        start.wait()
        for _ in range(5):
            try:
                outcomes.append(intervene(model, transcoders, tokens, [EDIT]).logits)
            except Exception as err:  # noqa: BLE001 - every outcome is inspected below
                outcomes.append(err)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(outcomes) == 20
    wrong = [o for o in outcomes if not isinstance(o, Exception) and not torch.equal(o, reference)]
    unclear = [
        o
        for o in outcomes
        if isinstance(o, Exception)
        and not (isinstance(o, RuntimeError) and "already running on this model" in str(o))
    ]
    assert not wrong, f"{len(wrong)} of 20 calls returned wrong logits"
    assert not unclear, unclear[:3]
    assert any(isinstance(o, torch.Tensor) for o in outcomes)


def test_error_intervene_while_another_thread_attributes_is_refused(world, monkeypatch):
    model, transcoders = world
    inside, go_on = threading.Event(), threading.Event()
    real = attribution.prune_graph

    def pause(*args, **kwargs):
        inside.set()
        assert go_on.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "prune_graph", pause)
    first = threading.Thread(
        target=lambda: attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)
    )
    first.start()
    try:
        assert inside.wait(120)
        with pytest.raises(RuntimeError, match="already running on this model .*take turns"):
            intervene(model, transcoders, PROMPT, [EDIT])
    finally:
        go_on.set()
        first.join(120)


# --- 3. Hooks already on the model, broken transcoders --------------------------------------------


def _my_hook(x, hook):
    return 2 * x


@pytest.mark.parametrize("kind", ["temporary", "permanent", "torch"])
def test_warning_a_hook_already_on_the_model_is_named_by_intervene(world, kind):
    model, transcoders = world
    site = "blocks.1.hook_mlp_out"
    handle = None
    if kind == "torch":
        handle = model.blocks[1].mlp.register_forward_hook(lambda module, args, out: out)
    else:
        model.add_hook(site, _my_hook, is_permanent=kind == "permanent")
    try:
        with pytest.warns(ExistingHooksWarning) as caught:
            intervene(model, transcoders, PROMPT, [EDIT])
    finally:
        model.reset_hooks(including_permanent=True)
        if handle is not None:
            handle.remove()
    expected = {
        "temporary": f"{site}: TransformerLens forward hook _my_hook",
        "permanent": f"{site}: TransformerLens permanent forward hook _my_hook",
        "torch": "blocks.1.mlp: torch forward hook",
    }[kind]
    assert len(caught) == 1 and expected in str(caught[0].message)


def test_warning_ablation_effects_warns_once_not_per_inner_call(world, graph):
    model, transcoders = world
    model.add_hook("blocks.1.hook_mlp_out", _my_hook)
    try:
        with pytest.warns(ExistingHooksWarning) as caught:
            ablation_effects(model, transcoders, graph, _latents(graph))
    finally:
        model.reset_hooks()
    assert len(caught) == 1


def _broken(transcoders, layer, how):
    import copy

    tcs = dict(transcoders)
    tcs[layer] = copy.deepcopy(transcoders[layer])
    if how == "nan":
        tcs[layer].W_dec.data[0, 0] = float("nan")
    elif how == "inf":
        tcs[layer].b_enc.data[2] = float("inf")
    else:
        tcs[layer].cfg.metadata.hook_name_out = "blocks.2.hook_mlp_out"
    return tcs


@pytest.mark.parametrize(
    "how, match",
    [
        ("nan", r"transcoders\[1\]\.W_dec has 1 NaN or inf"),
        ("inf", r"transcoders\[1\]\.b_enc has 1 NaN or inf"),
        ("other layer", r"transcoders\[1\] writes 'blocks.2.hook_mlp_out'.*'blocks.1.hook_mlp_out'"),
    ],
)
@pytest.mark.parametrize("entry", ["intervene", "intervene_generate", "ablation_effects"])
def test_error_broken_transcoders_are_refused(world, graph, how, match, entry):
    model, transcoders = world
    tcs = _broken(transcoders, 1, how)
    call = {
        "intervene": lambda: intervene(model, tcs, PROMPT, [EDIT]),
        "intervene_generate": lambda: intervene_generate(model, tcs, PROMPT, [EDIT], max_new_tokens=2),
        "ablation_effects": lambda: ablation_effects(model, tcs, graph, _latents(graph)),
    }[entry]
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("how", ["nan", "other layer"])
def test_error_run_with_latent_set_refuses_a_broken_transcoder(world, how):
    model, transcoders = world
    tc = _broken(transcoders, 1, how)[1]
    with pytest.raises(ValueError, match=r"transcoder(\.W_dec has 1 NaN| writes 'blocks.2)"):
        run_with_latent_set(model, tc, model.to_tokens(PROMPT), 3, 5, 0.0)


# --- 4. Numbers of the wrong kind: refused, not coerced -------------------------------------------


def _result_calls(g):
    latent = _latents(g, 1)[0]
    return {
        "predicted_effects index 3.9": (lambda m, t: predicted_effects(g, [latent + 0.9]), TypeError),
        "predicted_effects index -1": (lambda m, t: predicted_effects(g, [-1]), ValueError),
        "predicted_effects index True": (lambda m, t: predicted_effects(g, [True]), TypeError),
        "predicted_effects indices '12'": (lambda m, t: predicted_effects(g, "12"), TypeError),
        "ablation_effects scale 1e39": (
            lambda m, t: ablation_effects(m, t, g, [latent], scale=1e39),
            ValueError,
        ),
        "ablation_effects node_indices '12'": (lambda m, t: ablation_effects(m, t, g, "12"), TypeError),
        "ablation_effects logit_index of a latent": (
            lambda m, t: ablation_effects(m, t, g, [latent], logit_index=latent),
            ValueError,
        ),
        "ablation_effects logit_index 2.0": (
            lambda m, t: ablation_effects(m, t, g, [latent], logit_index=float(len(g.graph.nodes) - 1)),
            TypeError,
        ),
        "most_influential_latents n=True": (lambda m, t: most_influential_latents(g, True), TypeError),
        "most_influential_latents n=2.5": (lambda m, t: most_influential_latents(g, 2.5), TypeError),
    }


TYPE_CASES = {
    "position 3.7": (lambda m, t: intervene(m, t, PROMPT, [(1, 3.7, 5, 0.0)]), TypeError),
    "layer True": (lambda m, t: intervene(m, t, PROMPT, [(True, 3, 5, 0.0)]), TypeError),
    "latent 5.0": (lambda m, t: intervene(m, t, PROMPT, [(1, 3, 5.0, 0.0)]), TypeError),
    "constrained_layers '12'": (lambda m, t: intervene(m, t, PROMPT, [], constrained_layers="12"), TypeError),
    "constrained_layers [1.9]": (
        lambda m, t: intervene(m, t, PROMPT, [], constrained_layers=[1.9]),
        TypeError,
    ),
    "constrained_layers [True]": (
        lambda m, t: intervene(m, t, PROMPT, [], constrained_layers=[True]),
        TypeError,
    ),
    "negative token id": (lambda m, t: intervene(m, t, [2, -5, 7, 9], []), ValueError),
    "token id past the vocabulary": (lambda m, t: intervene(m, t, [2, m.cfg.d_vocab, 7], []), ValueError),
    "token ids as floats": (lambda m, t: intervene(m, t, [2.0, 5.0, 7.0], []), TypeError),
    "token ids as a bool tensor": (
        lambda m, t: intervene(m, t, torch.ones(4, dtype=torch.bool), []),
        ValueError,
    ),
    "prompt as bytes": (lambda m, t: intervene(m, t, PROMPT.encode(), []), TypeError),
    "max_new_tokens True": (
        lambda m, t: intervene_generate(m, t, PROMPT, [], max_new_tokens=True),
        TypeError,
    ),
    "max_new_tokens 2.0": (lambda m, t: intervene_generate(m, t, PROMPT, [], max_new_tokens=2.0), TypeError),
    "the same latent set twice": (lambda m, t: intervene(m, t, PROMPT, [EDIT, (1, 5, 3, 2.0)]), ValueError),
    "value 1e39": (lambda m, t: intervene(m, t, PROMPT, [(1, 5, 3, 1e39)]), ValueError),
    "value '1.0'": (lambda m, t: intervene(m, t, PROMPT, [(1, 5, 3, "1.0")]), TypeError),
    "freeze_attention 'no'": (lambda m, t: intervene(m, t, PROMPT, [], freeze_attention="no"), TypeError),
    "hold_errors 0": (lambda m, t: intervene(m, t, PROMPT, [], hold_errors=0), TypeError),
    "freeze_norms 'yes'": (lambda m, t: intervene(m, t, PROMPT, [], freeze_norms="yes"), TypeError),
    "interventions as a string": (lambda m, t: intervene(m, t, PROMPT, "1,5,3,0"), TypeError),
    "an unknown keyword": (lambda m, t: intervene(m, t, PROMPT, [], freeze_attn=True), TypeError),
    "run_with_latent_set position True": (
        lambda m, t: run_with_latent_set(m, t[1], m.to_tokens(PROMPT), True, 5, 0.0),
        TypeError,
    ),
    "run_with_latent_set latent 2.5": (
        lambda m, t: run_with_latent_set(m, t[1], m.to_tokens(PROMPT), 3, 2.5, 0.0),
        TypeError,
    ),
    "run_with_latent_set position past the prompt": (
        lambda m, t: run_with_latent_set(m, t[1], m.to_tokens(PROMPT), 500, 5, 0.0),
        ValueError,
    ),
    "run_with_latent_set latent past d_sae": (
        lambda m, t: run_with_latent_set(m, t[1], m.to_tokens(PROMPT), 3, 10**6, 0.0),
        ValueError,
    ),
    "run_with_latent_set value 1e39": (
        lambda m, t: run_with_latent_set(m, t[1], m.to_tokens(PROMPT), 3, 5, 1e39),
        ValueError,
    ),
    "run_with_latent_set value nan": (
        lambda m, t: run_with_latent_set(m, t[1], m.to_tokens(PROMPT), 3, 5, float("nan")),
        ValueError,
    ),
    "demeaned_logit token_id 2.5": (lambda m, t: demeaned_logit(torch.zeros(1, 3, 10), 2.5), TypeError),
    "agreement of two lengths": (lambda m, t: agreement(torch.zeros(3), torch.zeros(4)), ValueError),
    "intervene given the transcoders as the model": (lambda m, t: intervene(t, t, PROMPT, []), TypeError),
    "intervene given a list of transcoders": (
        lambda m, t: intervene(m, [t[i] for i in sorted(t)], PROMPT, []),
        TypeError,
    ),
}
RESULT_CASE_NAMES = [
    "predicted_effects index 3.9",
    "predicted_effects index -1",
    "predicted_effects index True",
    "predicted_effects indices '12'",
    "ablation_effects scale 1e39",
    "ablation_effects node_indices '12'",
    "ablation_effects logit_index of a latent",
    "ablation_effects logit_index 2.0",
    "most_influential_latents n=True",
    "most_influential_latents n=2.5",
]


# What each refusal must say: the argument, and what is wrong with it.
MESSAGES = {
    "position 3.7": r"interventions\[0\] position must be a whole number",
    "layer True": r"interventions\[0\] layer must be a whole number, got the bool",
    "latent 5.0": r"interventions\[0\] latent must be a whole number",
    "constrained_layers '12'": r"constrained_layers must be a list of layer numbers",
    "constrained_layers [1.9]": r"constrained_layers\[0\] must be a whole number",
    "constrained_layers [True]": r"constrained_layers\[0\] must be a whole number, got the bool",
    "negative token id": r"prompt_or_tokens\[1\] = -5 is not a token id",
    "token id past the vocabulary": r"prompt_or_tokens\[1\] = \d+ is not a token id",
    "token ids as floats": r"prompt_or_tokens\[0\] must be a whole number",
    "token ids as a bool tensor": r"integer tensor of ids, got dtype torch.bool",
    "prompt as bytes": r"prompt_or_tokens is bytes",
    "max_new_tokens True": r"max_new_tokens must be a whole number, got the bool",
    "max_new_tokens 2.0": r"max_new_tokens must be a whole number",
    "the same latent set twice": r"sets layer 1, position 5, latent 3 again",
    "value 1e39": r"value = 1e\+39 is beyond what torch.float32 holds",
    "value '1.0'": r"value must be a number",
    "freeze_attention 'no'": r"freeze_attention must be True or False",
    "hold_errors 0": r"hold_errors must be True or False",
    "freeze_norms 'yes'": r"freeze_norms must be True or False \(or None\)",
    "interventions as a string": r"interventions must be a list of \(layer, position, latent, value\)",
    "an unknown keyword": r"unexpected keyword argument 'freeze_attn'",
    "run_with_latent_set position True": r"position must be a whole number, got the bool",
    "run_with_latent_set latent 2.5": r"latent must be a whole number",
    "run_with_latent_set position past the prompt": r"position = 500 is out of range",
    "run_with_latent_set latent past d_sae": r"latent = 1000000 is out of range",
    "run_with_latent_set value 1e39": r"value = 1e\+39 is beyond",
    "run_with_latent_set value nan": r"value is nan",
    "demeaned_logit token_id 2.5": r"token_id must be a whole number",
    "agreement of two lengths": r"predicted and measured must be 1-d tensors of one length",
    "intervene given the transcoders as the model": r"model must be a HookedSAETransformer",
    "intervene given a list of transcoders": r"transcoders must be a dict \{layer: transcoder\}",
    "predicted_effects index 3.9": r"node_indices\[0\] must be a whole number",
    "predicted_effects index -1": r"node_indices\[0\] must be at least 0",
    "predicted_effects index True": r"node_indices\[0\] must be a whole number, got the bool",
    "predicted_effects indices '12'": r"node_indices must be a list of whole numbers",
    "ablation_effects scale 1e39": r"scale = 1e\+39 is beyond",
    "ablation_effects node_indices '12'": r"node_indices must be a list",
    "ablation_effects logit_index of a latent": r"logit_index \d+ is a latent node",
    "ablation_effects logit_index 2.0": r"logit_index must be a whole number",
    "most_influential_latents n=True": r"n must be a whole number, got the bool",
    "most_influential_latents n=2.5": r"n must be a whole number",
}


@pytest.mark.parametrize("case", TYPE_CASES, ids=list(TYPE_CASES))
def test_error_numbers_and_types_of_the_wrong_kind_are_refused(world, case):
    model, transcoders = world
    call, kind = TYPE_CASES[case]
    with pytest.raises(kind, match=MESSAGES[case]):  # names the argument and what is wrong with it
        call(model, transcoders)


@pytest.mark.parametrize("case", RESULT_CASE_NAMES, ids=RESULT_CASE_NAMES)
def test_error_result_arguments_of_the_wrong_kind_are_refused(world, graph, case):
    model, transcoders = world
    call, kind = _result_calls(graph)[case]
    with pytest.raises(kind, match=MESSAGES[case]):
        call(model, transcoders)


def test_correct_numpy_and_torch_integers_are_whole_numbers(world):
    model, transcoders = world
    plain = intervene(model, transcoders, PROMPT, [EDIT], constrained_layers=[1, 2])
    wrapped = intervene(
        model,
        transcoders,
        PROMPT,
        [(np.int64(1), torch.tensor(5), np.int32(3), np.float32(0.0))],
        constrained_layers=range(1, 3),
        freeze_attention=np.bool_(True),
    )
    assert torch.equal(plain.logits, wrapped.logits)


def test_correct_token_ids_in_every_form_give_the_text_prompts_logits(world):
    model, transcoders = world
    tokens = model.to_tokens(PROMPT)
    by_text = intervene(model, transcoders, PROMPT, [EDIT]).logits
    for form in (tokens, tokens[0], tokens[0].tolist(), tokens.tolist(), tokens.int()):
        assert torch.equal(intervene(model, transcoders, form, [EDIT]).logits, by_text)


def test_correct_interventions_from_a_generator_are_read_once(world):
    model, transcoders = world
    listed = intervene(model, transcoders, PROMPT, [EDIT, (2, 6, 7, 1.5)]).logits
    generated = intervene(model, transcoders, PROMPT, (e for e in [EDIT, (2, 6, 7, 1.5)])).logits
    assert torch.equal(listed, generated)
    text = intervene_generate(model, transcoders, PROMPT, iter([EDIT]), max_new_tokens=2)
    assert text == intervene_generate(model, transcoders, PROMPT, [EDIT], max_new_tokens=2)


# --- 5. Saved results -----------------------------------------------------------------------------


def _tamper(res, tmp_path, **changes) -> Path:
    path = res.save(tmp_path / "graph.pt")
    raw = torch.load(path, weights_only=True)
    raw.update(changes)
    torch.save(raw, path)
    return path


@pytest.mark.parametrize(
    "change, match",
    [
        ("adjacency 5x5", r"adjacency_matrix has shape \(5, 5\)"),
        ("kept index out of range", r"kept_indices must be node indices"),
        ("influence too short", r"influence has shape"),
        ("writing_vecs not a tensor", r"writing_vecs is a list"),
        ("a missing field", r"KeyError"),
    ],
)
def test_error_load_refuses_a_damaged_file(graph, tmp_path, change, match):
    n = len(graph.graph.nodes)
    path = {
        "adjacency 5x5": lambda: _tamper(graph, tmp_path, adjacency_matrix=torch.zeros(5, 5)),
        "kept index out of range": lambda: _tamper(
            graph, tmp_path, kept_indices=torch.full_like(graph.kept_indices, n + 3)
        ),
        "influence too short": lambda: _tamper(graph, tmp_path, influence=torch.zeros(n - 1)),
        "writing_vecs not a tensor": lambda: _tamper(graph, tmp_path, writing_vecs=[1.0, 2.0]),
        "a missing field": lambda: _drop(graph.save(tmp_path / "graph.pt"), "prompt"),
    }[change]()
    with pytest.raises(ValueError, match=rf"is damaged: .*{match}"):
        AttributionResult.load(path)


def _drop(path: Path, key: str) -> Path:
    raw = torch.load(path, weights_only=True)
    del raw[key]
    torch.save(raw, path)
    return path


def test_error_a_result_from_another_world_is_refused_by_ablation_effects(world, other_graph, tmp_path):
    model, transcoders = world
    reloaded = AttributionResult.load(other_graph.save(tmp_path / "other.pt"))  # the fingerprint survives
    for res in (other_graph, reloaded):
        with pytest.raises(ValueError, match=r"another world .*transcoder 0's weights differ"):
            ablation_effects(model, transcoders, res, _latents(res))


def test_correct_a_reloaded_result_is_accepted_by_its_own_world(world, graph, tmp_path):
    model, transcoders = world
    reloaded = AttributionResult.load(graph.save(tmp_path / "graph.pt"))
    assert reloaded.world == graph.world and reloaded.world["model_name"] == model.cfg.model_name
    predicted, measured = ablation_effects(model, transcoders, reloaded, _latents(reloaded))
    expected = ablation_effects(model, transcoders, graph, _latents(graph))
    assert torch.equal(predicted, expected[0]) and torch.equal(measured, expected[1])


def test_error_save_onto_a_folder_names_it_and_leaves_nothing(graph, tmp_path):
    folder = tmp_path / "graph"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"is a folder: pass a file path inside it"):
        graph.save(folder)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["graph"]


def test_error_an_interrupted_save_keeps_the_old_file_and_leaves_no_partial(graph, tmp_path, monkeypatch):
    path = graph.save(tmp_path / "graph.pt")
    before = path.read_bytes()

    def interrupted(obj, f, *args, **kwargs):
        (f.write if hasattr(f, "write") else Path(f).write_bytes)(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        graph.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.pt"]
    assert path.read_bytes() == before


def test_error_an_unwritable_folder_says_so_in_one_sentence(graph):
    with pytest.raises(OSError, match=r"cannot write /sys/graph\.pt \(.*\): choose a file you can write"):
        graph.save("/sys/graph.pt")


def test_error_cli_result_from_another_world_is_refused(other_graph, tmp_path, capsys):
    path = other_graph.save(tmp_path / "other.pt")
    with pytest.raises(SystemExit) as info:
        cli.main(["--world", "toy", "--result", str(path), "--out", str(tmp_path / "out"), "--no-dashboard"])
    assert info.value.code == 1
    assert "does not fit --world toy" in capsys.readouterr().err


# --- 6. The CLI's outputs -------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A complete earlier run with the dashboard (what a Ctrl-C must not spoil)."""
    out = tmp_path_factory.mktemp("cli") / "graph"
    cli.main(["--out", str(out), "--batch-size", "64", "--no-examples"])
    return out, _files(out)


def test_error_ctrl_c_after_nodes_json_leaves_the_previous_run_whole(first_run, monkeypatch, tmp_path):
    import shutil

    from part3_attribution_graphs import utils

    out = tmp_path / "graph"
    shutil.copytree(first_run[0], out)

    def ctrl_c(*args, **kwargs):  # nodes.json and graph.pt are written by now
        raise KeyboardInterrupt

    monkeypatch.setattr(utils, "create_attribution_dashboard", ctrl_c)
    with pytest.raises(SystemExit) as info:
        cli.main(["--out", str(out), "--batch-size", "64", "--no-examples", "--top-k", "3"])
    assert info.value.code == 130
    assert _files(out) == first_run[1]  # the old set, whole: no new nodes.json beside the old index.html
    assert [p.name for p in out.iterdir() if p.is_dir()] == []  # no staging folder left


def test_correct_a_run_without_the_dashboard_removes_the_stale_one(first_run, tmp_path):
    import shutil

    out = tmp_path / "graph"
    shutil.copytree(first_run[0], out)
    summary = cli.main(["--out", str(out), "--batch-size", "64", "--no-dashboard", "--top-k", "3"])
    assert summary["files"] == ["graph.pt", "nodes.json"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["graph.pt", "nodes.json"]


def test_error_a_users_own_index_html_is_not_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "graph"
    out.mkdir()
    mine = out / "index.html"
    mine.write_text("<p>my notes</p>")
    (out / "notes.txt").write_text("mine too")
    with pytest.raises(SystemExit) as info:
        cli.main(["--out", str(out), "--batch-size", "64", "--no-examples"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "already holds index.html" in err and "--force" in err
    assert mine.read_text() == "<p>my notes</p>" and sorted(p.name for p in out.iterdir()) == [
        "index.html",
        "notes.txt",
    ]


def test_correct_force_replaces_the_users_file_and_keeps_the_others(tmp_path):
    out = tmp_path / "graph"
    out.mkdir()
    (out / "index.html").write_text("<p>my notes</p>")
    (out / "notes.txt").write_text("mine too")
    cli.main(["--out", str(out), "--batch-size", "64", "--no-examples", "--force"])
    assert "<p>my notes</p>" not in (out / "index.html").read_text()
    assert (out / "notes.txt").read_text() == "mine too"
    # A second run replaces its own files without --force.
    cli.main(["--out", str(out), "--batch-size", "64", "--no-dashboard"])


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--out", ""], "argument --out: is empty"),
        (["--out", "  "], "argument --out: is empty"),
        (["--result", "g.pt", "--user", "Hi"], "--user choose(s) what to attribute, but --result"),
        (["--result", "g.pt", "--top-k", "3"], "--top-k choose(s) what to attribute"),
    ],
)
def test_error_cli_arguments_that_would_be_misread(args, complaint, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what an unchecked --out '' would write into
    with pytest.raises(SystemExit) as info:
        cli.main([*args, "--no-dashboard"])
    assert info.value.code == 2
    assert complaint in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- 7. The autograder puts back global torch state -----------------------------------------------


def test_correct_the_autograder_restores_global_torch_state(capsys):
    before = (
        torch.get_default_dtype(),
        torch.is_grad_enabled(),
        torch.are_deterministic_algorithms_enabled(),
        torch.get_float32_matmul_precision(),
        torch.get_rng_state(),
    )

    def compute_influence(*args, **kwargs):  # correct, but careless with global settings
        torch.set_default_dtype(torch.float64)
        torch.set_grad_enabled(False)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(1234)
        answer = solutions.compute_influence(*args, **kwargs)
        # Set after the work: "medium" lets a CPU with bfloat16 units (AMX) round float32 matmuls to bfloat16,
        # which would make this answer wrong (1e-3 off) rather than careless.
        torch.set_float32_matmul_precision("medium")
        return answer

    try:
        autograder.test_compute_influence(compute_influence)
        after = (
            torch.get_default_dtype(),
            torch.is_grad_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            torch.get_float32_matmul_precision(),
        )
        rng_same = torch.equal(torch.get_rng_state(), before[4])
    finally:
        torch.set_default_dtype(before[0])
        torch.set_grad_enabled(before[1])
        torch.use_deterministic_algorithms(before[2])
        torch.set_float32_matmul_precision(before[3])
        torch.set_rng_state(before[4])
    assert "passed" in capsys.readouterr().out
    assert after == before[:4] and rng_same


# --- The guard covers every public entry point ----------------------------------------------------


def _public_callables(module) -> dict[str, object]:
    """Public functions defined in `module`, and the public methods of its classes (properties aside)."""
    found = {}
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        home = getattr(inspect.unwrap(obj), "__module__", None) if callable(obj) else None
        if inspect.isfunction(inspect.unwrap(obj)) and home == module.__name__:
            found[f"{module.__name__}.{name}"] = obj
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            for attr, member in vars(obj).items():
                fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if not attr.startswith("_") and inspect.isfunction(inspect.unwrap(fn)):
                    found[f"{module.__name__}.{name}.{attr}"] = getattr(obj, attr)
    return found


def public_modules() -> list:
    """Every public module of the package (a module whose dotted name has no part starting with "_")."""
    import importlib
    import pkgutil

    import part3_attribution_graphs as package

    names = [m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
    return [
        importlib.import_module(n) for n in sorted(names) if not any(p.startswith("_") for p in n.split("."))
    ]


def public_functions() -> dict[str, object]:
    found: dict[str, object] = {}
    for module in public_modules():
        found.update(_public_callables(module))
    return found


# What a function that needs the guard takes: a model, transcoders, a result, a clean run, token ids or
# tensors, by parameter name or annotation.
_MODEL_PARAMETERS = {
    "model",
    "transcoders",
    "transcoder",
    "tc",
    "result",
    "tokens",
    "prompt_or_tokens",
    "hf_model",
}
_MODEL_TYPES = (
    "HookedSAETransformer",
    "Transcoder",
    "Tensor",
    "AttributionResult",
    "CleanRun",
    "GraphNodes",
    "Module",
    "ActivationCache",
    "SyntheticResult",
)


def takes_model_or_tensors(fn) -> bool:
    return any(
        p.name in _MODEL_PARAMETERS or any(t in str(p.annotation) for t in _MODEL_TYPES)
        for p in inspect.signature(inspect.unwrap(fn)).parameters.values()
    )


_P = "part3_attribution_graphs."

# Public functions that are not entry points because they take no model, transcoders, result or tensor (the
# test checks their signatures): whole modules, then single functions, each with why.
NO_MODEL_MODULES = {
    "arguments": "argparse number types",
    "staging": "moves files into a folder",
    "exercises": "the exercise catalogue: names and text",
    "tools.bench_dashboard": "times a page built from a synthetic result it makes itself",
    "tools.case_study_table": "reads a notebook's outputs and edits the README",
    "tools.chromium": "drives a browser",
    "tools.gpu_bench": "runs tools.bench and edits the README table",
    "tools.jupyterlab_check": "checks a JupyterLab install",
    "tools.memory": "measures memory of worlds it builds itself",
    "tools.notebook_builder": "builds the notebooks from the lesson's text",
    "views.palette": "colours and token text",
    "views.remote_safetensors": "reads byte ranges of hub files",
    "worlds.gemma": "loaders: they build the model (no model passed in)",
    "worlds.gguf_tokenizer": "reads a GGUF file's tokenizer",
    "worlds.hub": "hub tokens and requests",
    "worlds.registry": "names and loads the worlds",
    "worlds.toy": "builds the toy world",
}
NO_MODEL_FUNCTIONS = {
    "attribution.read_hook_name": "a hook's name",
    "attribution.write_hook_name": "a hook's name",
    "checks.as_count": "a number check",
    "checks.check_prompt": "a text check",
    "explorer.AttributionExplorer.result_for": "a method of an explorer that attribution_explorer built",
    "explorer.AttributionExplorer.update": "ditto",
    "explorer.AttributionExplorer.add_prompt": "ditto",
    "guard.as_flag": "a number check",
    "guard.as_index": "a number check",
    "guard.as_indices": "a number check",
    "guard.as_layers": "a number check",
    "guard.as_real": "a number check",
    "guard.guarded": "the guard's decorator",
    "linear_model.LinearisedModel.clean_inputs": "a method of a linearised copy, no model passed in",
    "linear_model.LinearisedModel.zero_inputs": "ditto",
    "linear_model.LinearisedModel.bias_inputs": "ditto",
    "pruning.check_threshold": "a number check",
    "replacement.TranscoderReplacementHooks.install": "a method of hooks built for a checked model",
    "replacement.TranscoderReplacementHooks.remove": "ditto",
    "tools.bench.run_case": "builds its own world from a case name",
    "tools.bench.shrink": "a smaller world spec",
    "tools.bench.format_table": "formats numbers",
    "views.dashboard.derived_label": "a panel's label",
    "views.labels.corpus_presence": "counts words of example data (a dict of a corpus and its top examples)",
    "views.labels.enriched_words": "ditto",
    "views.labels.latent_labels": "ditto",
    "views.labels.derived_labels": "ditto",
    "views.labels.peak_tokens": "ditto",
    "views.suggestions.suggested_groups": "joins lists of (layer, latent) keys",
    "views.suggestions.group_scores": "scores lists of (layer, latent) keys",
    "views.suggestions.recovered_groups": "ditto",
    "views.examples.FeatureTable.to_html": "renders a table it holds",
    "worlds.gemma270m.peak_rss_gib": "a memory figure",
    "worlds.gemma270m.main": "command line: loads its own world",
    "worlds.gemma270m_scope.main": "command line: loads its own world",
    "tools.bench.main": "command line",
    "tools.crosscheck.our_node_key": "a node's key",
    "tools.crosscheck.ct_node_keys": "keys of a circuit-tracer graph",
    "tools.ground_truth.table": "formats numbers",
    "tools.ground_truth.main": "command line: loads its own world",
    "tools.train_planted.corpus": "builds token lists",
    "tools.train_planted.train_model": "builds and trains its own model",
    "tools.train_planted.train_world": "builds and trains its own world",
    "tools.train_planted.write_world": "writes state dicts to files",
    "tools.train_planted.world_folder": "names a folder",
    "tools.train_planted.build_parser": "command line",
    "tools.train_planted.main": "command line",
    "views.case_study_figures.plot_path": "draws labels and numbers",
    "views.case_study_figures.plot_intervention_rates": "draws numbers",
    "views.case_study_figures.plot_question_results": "draws numbers",
    "case_study.enrichment": "arithmetic over graph scores",
    "case_study.misleading_question": "picks a question from graph scores",
    "case_study.subspace_site": "reads a site off the planted truth",
    "explorer.figure_svg": "renders a figure",
    "tools.ground_truth.sweep_figure": "draws numbers",
    "worlds.offline_hub.OfflineHub.server_errors": "a test server's switch",
    "worlds.offline_hub.OfflineHub.reset_mid_body": "a test server's switch",
    "views.circuit_tracer_export.feature_json": "formats one feature's data",
    "views.dashboard.render_dashboard_html": "renders a dict",
    "views.dashboard.read_saved_state": "reads a JSON file",
    "views.examples.example_repo_id": "a hub repository's name",
    "views.examples.example_file_path": "a hub file's name",
    "views.examples.load_example_data": "downloads example data",
    "views.figures.random_layered_dag": "a random graph for the pruning demo",
    "views.figures.demo_pruning": "runs pruning functions on random graphs",
    "views.intervention_figures.plot_steering_sweep": "draws numbers",
    "views.neuronpedia.node_kind": "a node's kind",
    "views.neuronpedia.cantor_pair": "arithmetic",
    "views.neuronpedia.export_node_id": "a node's id",
    "views.neuronpedia.saved_state": "reads a dict",
    "views.neuronpedia.apply_state": "edits dicts",
    "views.neuronpedia.load_schema": "reads the schema file",
    "worlds.gemma270m.assemble_gguf": "downloads a file",
    "worlds.gemma270m.calibration_text": "text",
    "worlds.gemma270m.calibration_tokens": "tokenizes text",
    "worlds.gemma270m.default_cache_dir": "a path",
    "worlds.gemma270m.gemma3_270m_config": "a config",
    "worlds.gemma270m.load_gemma3_270m_offline": "a loader: builds the model",
    "worlds.gemma270m.load_hf_gemma3_270m": "a loader",
    "worlds.gemma270m_scope.listed_l0": "numbers",
    "worlds.gemma270m_scope.transcoders_cached": "a file check",
    "worlds.gemma270m_scope.print_fit_report": "prints numbers",
    "worlds.gemma270m_scope.load_gemma270m_scope_world": "a loader",
    "worlds.offline_hub.real_example_schema": "a file layout",
    "worlds.offline_hub.offline_hub": "serves files",
    "worlds.offline_hub.OfflineHub.rate_limit": "a test server's switch",
    "worlds.offline_hub.OfflineHub.expire_signed_urls": "a test server's switch",
    "worlds.offline_hub.OfflineHub.commit": "a test server's state",
    "worlds.offline_hub.OfflineHub.file_at": "a test server's state",
    "worlds.offline_hub.OfflineHub.xorbs": "a test server's storage",
    "worlds.offline_hub.OfflineHub.etag": "a file's tag",
    "worlds.planted.planted_facts": "the planted facts",
    "worlds.planted.planted_groups": "names",
    "worlds.planted.planted_members": "names",
    "worlds.planted.planted_words": "words",
    "worlds.planted.make_planted_tokenizer": "a tokenizer",
    "worlds.planted.load_planted_world": "a loader",
    "worlds.planted.build_planted_model": "builds a model",
    "worlds.planted.planted_data_dir": "a path",
    "worlds.planted.example_corpus": "token ids it makes itself",
    "worlds.synthetic.make_world": "builds a world",
    "worlds.synthetic.new_skip_transcoder": "builds a transcoder",
}
# Public functions that take a model, transcoders, a result or tensors and are not entry points, by why.
NOT_ENTRY_POINTS = {
    "the guard's own checks, which @guarded calls (guarding them would check twice)": {
        "checks.check_attribute_inputs",
        "checks.check_finite_adjacency",
        "checks.check_finite_weights",
        "checks.check_some_transcoders",
        "checks.check_transcoder",
        "checks.check_transcoders",
        "checks.existing_hooks",
        "checks.foreign_mlp",
        "fingerprints.tensor_digest",
        "fingerprints.versions",
        "fingerprints.weights_digest",
        "guard.check_clean_run_fresh",
        "guard.check_interventions",
        "guard.check_latent_nodes",
        "guard.check_result_fits",
        "guard.check_token_input",
        "guard.check_token_rows",
        "guard.clean_run_state",
        "guard.model_session",
        "checks.check_context",
        "guard.world_fingerprint",
        "guard.check_model",
    },
    "stages of attribute on objects it prepared and checked; the exercises re-implement them and the graders "
    "call them with hand-made inputs": {
        "attribution.setup_attribution",
        "attribution.prepare_backward_batches",
        "attribution.compute_adjacency_matrix",
        "attribution.transposed_adjacency_matrix",
        "attribution.logit_direct_influence",
        "attribution.fold_latents",
        "attribution.run_frozen_forward",
        "attribution.logit_weights_of",
        "attribution.validate_transcoders",
        "nodes.compute_salient_logits",
        "nodes.build_embedding_nodes",
        "nodes.build_intermediate_nodes",
        "nodes.build_logit_nodes",
        "nodes.build_graph_nodes",
        "pruning.normalize_matrix",
        "pruning.compute_influence",
        "pruning.prune_nodes",
        "pruning.prune_edges",
        "pruning.prune_graph",
        "pruning.n_to_cross",
        "replacement.FreezeHooks.cache_frozen_values",
        "replacement.skip_output",
        "replacement.hook_names_out",
        "transposed.TransposedModel.supports",
        "transposed.TransposedModel.gradients",
        "linear_model.LinearisedModel.forward",
        "linear_model.LinearisedModel.read_values",
        "linear_model.LinearisedModel.edge_by_perturbation",
        "tools.bench.seed_compute_adjacency_matrix",
        "tools.bench.seed_setup_attribution",
        "tools.bench.floor_flops",
        "tools.bench.matmul_rate",
    },
    "exercise references that read a pruned matrix only (no model runs), graded on hand-made stand-ins": {
        "case_study.strongest_path",
        "case_study.path_shares",
        "case_study.score_graph",  # not an exercise: reads nodes and kept indices, tested the same way
    },
    "graders: they take the learner's function and run the (guarded) references": {
        f"tests.{name}.test_{name}"
        for name in (
            "build_embedding_nodes",
            "build_intermediate_nodes",
            "compute_adjacency_matrix",
            "compute_influence",
            "compute_salient_logits",
            "predicted_effects",
            "prepare_backward_batches",
            "prune_edges",
            "prune_nodes",
            "run_with_latent_set",
            "strongest_path",
            "swap_group",
            "transcoder_replacement_hooks",
        )
    },
    "the circuit-tracer cross-check's adapters, on worlds and graphs its own main builds": {
        "tools.crosscheck.ct_transcoder_set",
        "tools.crosscheck.ct_replacement_model",
        "tools.crosscheck.ct_attribute",
        "tools.crosscheck.aligned_adjacency",
        "tools.crosscheck.to_ct_graph",
    },
    "training and fixture helpers on tensors they are handed by their own callers (no model runs)": {
        "case_study.same_site_control",
        "tools.train_planted.train_transcoder",
        "worlds.synthetic.fit_affine_skip",
        "worlds.synthetic.set_transcoder_params",
        "worlds.offline_hub.write_example_files",
        "worlds.offline_hub.OfflineHub.reupload",
    },
    "views that draw a result or tensors the learner already has (no model runs)": {
        "views.case_study_figures.plot_group_latents",
        "views.examples.features_in_graph",
        "views.examples.feature_row",
        "views.examples.feature_examples",
        "views.examples.activation_histogram",
        "views.examples.inspect_feature",
        "views.figures.plot_cumulative_influence",
        "views.intervention_figures.plot_predicted_vs_measured",
        "views.neuronpedia.kept_nodes",
        "views.neuronpedia.result_influence",
        "views.neuronpedia.result_settings",
        "views.neuronpedia.result_tokens",
        "views.neuronpedia.export_node_ids",
        "views.neuronpedia.view_graph",
        "views.neuronpedia.cumulative_influence",
        "views.neuronpedia.pruned_edges",
        "views.sliders.slider_graph",
        "views.sliders.float32_list",
        "views.examples.load_example_data_parallel",
        "views.dashboard.panel_latents",
        "explorer.graph_counts",
    },
    "predicates that read one attribute of what they are handed (no model runs, nothing to refuse)": {
        "worlds.planted.is_planted_model",
    },
    "writers of the transcoders they are handed, for the offline hub's fixtures (no model runs)": {
        "worlds.offline_hub.write_gemmascope_layout",
    },
}


def _short(name: str) -> str:
    return name.removeprefix(_P)


def test_every_public_function_is_guarded_or_listed_with_a_reason():
    listed = {n for names in NOT_ENTRY_POINTS.values() for n in names}
    unaccounted, misfiled = [], []
    for name, fn in public_functions().items():
        short = _short(name)
        if name in guard.ENTRY_POINTS:
            assert short not in listed, f"{short} is guarded now: take it off NOT_ENTRY_POINTS"
            continue
        no_model = short in NO_MODEL_FUNCTIONS or any(short.startswith(m + ".") for m in NO_MODEL_MODULES)
        if no_model and takes_model_or_tensors(fn):
            misfiled.append(short)
        elif not no_model and short not in listed:
            unaccounted.append(short)
    assert not misfiled, f"listed as taking no model, but their signatures take one: {misfiled}"
    assert not unaccounted, f"public, not guarded, not listed with a reason: {unaccounted}"
    public = {_short(n) for n in public_functions()}
    stale = sorted((listed | set(NO_MODEL_FUNCTIONS)) - public)
    assert not stale, f"listed but no longer public functions: {stale}"
    unknown_modules = sorted(m for m in NO_MODEL_MODULES if not any(p.startswith(m + ".") for p in public))
    assert not unknown_modules, unknown_modules


def entry_points() -> dict[str, object]:
    """Every guarded public function of every public module (what the test below calls)."""
    return {name: fn for name, fn in public_functions().items() if name in guard.ENTRY_POINTS}


def test_the_entry_point_list_covers_the_issue():
    names = set(entry_points())
    for expected in (
        "attribution.attribute",
        "interventions.intervene",
        "interventions.intervene_generate",
        "interventions.run_with_latent_set",
        "interventions.predicted_effects",
        "interventions.ablation_effects",
        "interventions.clean_run",
        "result.AttributionResult.load",
        "result.AttributionResult.save",
        "result.prune",
        "case_study.swap_group",
        "case_study.firing_rates",
        "explorer.attribution_explorer",
    ):
        assert f"part3_attribution_graphs.{expected}" in names


class _Entered(Exception):
    pass


@pytest.mark.parametrize("name", sorted(entry_points()))
def test_every_public_entry_point_goes_through_the_guard(name, monkeypatch):
    fn = entry_points()[name]
    assert name in guard.ENTRY_POINTS, f"{name} is not declared with @guarded"

    def entered(*args, **kwargs):
        raise _Entered

    monkeypatch.setattr(guard, "model_session", entered)
    monkeypatch.setattr(guard, "_no_session", entered)
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    with pytest.raises(_Entered):  # the guard runs before the body, whatever the arguments
        fn(*[object()] * len(params))


# --- Issue 27: the views', worlds' and tools' entry points refuse bad input before they run --------------


def test_error_the_dashboard_refuses_a_result_from_another_world(world, other_graph, tmp_path):
    from part3_attribution_graphs.views.dashboard import create_attribution_dashboard

    model, transcoders = world
    out = tmp_path / "dashboard"
    with pytest.raises(ValueError, match=r"made on another world than the model and transcoders given"):
        create_attribution_dashboard(other_graph, model, transcoders, output_dir=out, display=False)
    assert not out.exists()  # refused before anything was written


def test_error_the_dashboard_needs_the_model_with_the_transcoders(world, graph):
    from part3_attribution_graphs.views.dashboard import dashboard_data

    _, transcoders = world
    with pytest.raises(ValueError, match=r"transcoders were given without the model.*Pass the model too"):
        dashboard_data(graph, None, transcoders)


def test_error_logit_tables_refuse_a_negative_count_and_a_latent_past_d_sae(world):
    from part3_attribution_graphs.views.dashboard import latent_logit_tables

    model, transcoders = world
    with pytest.raises(ValueError, match=r"k must be at least 1, got -1"):
        latent_logit_tables(model, transcoders, [(1, 5)], k=-1)
    d_sae = transcoders[1].cfg.d_sae
    with pytest.raises(ValueError, match=rf"latents\[0\] latent = {d_sae} is out of range"):
        latent_logit_tables(model, transcoders, [(1, d_sae)])


def test_error_the_neuronpedia_export_refuses_transcoders_of_another_world(world, graph, tmp_path):
    from part3_attribution_graphs.views.neuronpedia import export_neuronpedia

    model, _ = world
    _, others = make_toy_world(
        seed=1
    )  # same shapes, other weights: only the result's record tells them apart
    path = tmp_path / "graph.json"
    with pytest.raises(ValueError, match=r"transcoder \d+'s weights differ"):
        export_neuronpedia(graph, model, others, path=path)
    assert not path.exists()


def test_error_example_data_longer_than_the_context_is_refused_before_the_model_runs(world):
    from part3_attribution_graphs.views.examples import make_toy_example_data

    model, transcoders = world
    # Unrefused, TransformerLens would grow the model's rotary buffers to 500 positions (the fixture sees it).
    with pytest.raises(ValueError, match=r"seq_len has 500 tokens but the model's context holds n_ctx=128"):
        make_toy_example_data(model, transcoders, n_sequences=2, seq_len=500)


def test_error_gemma270m_helpers_refuse_token_ids_past_the_vocabulary_and_mismatched_shapes(world, tmp_path):
    from part3_attribution_graphs.worlds.gemma270m import mean_l0
    from part3_attribution_graphs.worlds.gemma270m_scope import fit_report, write_random_transcoders

    model, transcoders = world
    tokens = torch.tensor([[2, 5, 7], [2, model.cfg.d_vocab, 7]])
    with pytest.raises(ValueError, match=rf"tokens\[1, 1\] = {model.cfg.d_vocab} is not a token id"):
        mean_l0(model, transcoders, tokens)
    with pytest.raises(ValueError, match=r"transcoders is empty"):
        fit_report(model, {}, PROMPT)
    with pytest.raises(ValueError, match=r"d_model = 32, but the model's is 64"):
        write_random_transcoders(tmp_path, model, n_layers=2, d_model=32, d_sae=16)
    assert not any(tmp_path.iterdir())


def test_error_collect_activations_names_the_row_and_place_of_a_bad_token_id(world):
    from part3_attribution_graphs.tools.train_planted import collect_activations

    model, _ = world
    with pytest.raises(ValueError, match=rf"text\[1, 2\] = {model.cfg.d_vocab} is not a token id"):
        collect_activations(model, [[2, 5], [2, 5, model.cfg.d_vocab]])


@pytest.fixture
def planted_left_clean(planted_world):
    """The planted model ends a case as it began: same parameters and buffers, no hooks."""
    model, _ = planted_world
    before = _state(model)
    yield planted_world
    now = _state(model)
    assert now.keys() == before.keys()
    assert all(torch.equal(now[k], before[k]) for k in before), "the planted model changed"
    assert hook_count(model) == 0


@pytest.mark.parametrize(
    "kwargs, kind, match",
    [
        ({"n_pairs": 0}, ValueError, r"n_pairs must be at least 1, got 0"),
        ({"n_prompts": 2.5}, TypeError, r"n_prompts must be a whole number"),
        ({"sweep": "no"}, TypeError, r"sweep must be True or False"),
        ({"layers": [0]}, ValueError, r"transcoders must have one entry per layer 0\.\.3"),
    ],
)
def test_error_ground_truth_measure_refuses_bad_arguments_before_it_runs(
    planted_left_clean, monkeypatch, kwargs, kind, match
):
    from part3_attribution_graphs.tools import ground_truth

    def ran(*args, **kwargs):
        raise AssertionError("measure ran the model with a bad argument")

    # measure's first step: reaching it means the argument was not refused (and would cost minutes).
    monkeypatch.setattr(ground_truth.planted, "planted_accuracy", ran)
    model, transcoders = planted_left_clean
    layers = kwargs.pop("layers", sorted(transcoders))
    with pytest.raises(kind, match=match):
        ground_truth.measure(model, {layer: transcoders[layer] for layer in layers}, **kwargs)
