"""The autograder grades correctly: every reference and every correct alternative passes, every known
mistake fails with the hint that names it, and no test leaves a trace on the model it ran on."""

from __future__ import annotations

import contextlib
import io
import time

import pytest
import torch

import part3_attribution_graphs.tests as autograder
from part3_attribution_graphs import (
    attribution,
    case_study,
    interventions,
    nodes,
    pruning,
    replacement,
    solutions,
)
from part3_attribution_graphs.exercises import EXERCISES
from part3_attribution_graphs.tests import hygiene, running, worlds
from part3_attribution_graphs.toy import make_toy_world

try:  # tests/ has no __init__.py: pytest puts this folder on sys.path
    from mutants import ALTERNATIVES, MUTANTS, catalogue_by_exercise
except ImportError:  # pragma: no cover - if tests/ ever becomes a package
    from tests.mutants import ALTERNATIVES, MUTANTS, catalogue_by_exercise

# {exercise: the reference answer}, from the registry: a new exercise is picked up here with no edit.
REFERENCE = {e.name: getattr(solutions, e.qualname) for e in EXERCISES}


def grade(exercise: str, impl, time_limit_s: float | None = None, **kwargs) -> tuple[str | None, str]:
    """Run one autograder test: (failure message or None, what it printed on stdout)."""
    out = io.StringIO()
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(io.StringIO()),
            time_limit(time_limit_s),
        ):
            getattr(autograder, f"test_{exercise}")(impl, **kwargs)
    except AssertionError as e:
        return str(e), out.getvalue()
    return None, out.getvalue()


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """The autograder's per-call time limit, set to `seconds` for a while (None: leave it)."""
    saved = running.TIME_LIMIT_S, running.REAL_TIME_LIMIT_S
    if seconds is not None:
        running.TIME_LIMIT_S = running.REAL_TIME_LIMIT_S = seconds
    try:
        yield
    finally:
        running.TIME_LIMIT_S, running.REAL_TIME_LIMIT_S = saved


def one_thread():
    """Toy-sized matrices: one thread beats two on a busy 2-core machine (the graders' own switch)."""
    return worlds._one_thread(True)


def hook_total(model) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())


def fingerprint(model, transcoders) -> list[torch.Tensor]:
    params = list(model.state_dict().values()) + [
        p for tc in transcoders.values() for p in tc.state_dict().values()
    ]
    return [p.detach().clone() for p in params]


@pytest.fixture(scope="module")
def grader_world():
    """The toy world the autograder builds and caches for itself (what a learner's calls run on)."""
    return worlds._get_world(None, None)


@pytest.fixture(scope="module")
def second_world():
    """Stands in for 'the model the notebook loaded', passed as model=..., transcoders=...."""
    with one_thread():
        return make_toy_world(seed=1)


@pytest.fixture(autouse=True)
def leaves_no_trace(grader_world):
    """Whatever a test does, the grader's model ends with the hooks and weights it started with."""
    world = worlds._get_world(None, None)  # rebuilt if a test changed the cached world's tensors
    model, tcs = world.model, world.transcoders
    hooks, before = hook_total(model), fingerprint(model, tcs)
    yield
    assert hook_total(model) == hooks, "a test left hooks on the autograder's model"
    after = fingerprint(model, tcs)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a test changed the autograder's weights"


def _id(m) -> str:
    return f"{m.exercise}:{m.name}"


@pytest.mark.parametrize("exercise", sorted(REFERENCE))
def test_reference_passes_with_one_line(exercise):
    message, printed = grade(exercise, REFERENCE[exercise])
    assert message is None, message
    assert printed == f"All tests in `test_{exercise}` passed!\n"


@pytest.mark.parametrize("m", MUTANTS, ids=_id)
def test_mutant_fails_with_its_hint(m):
    message, printed = grade(m.exercise, m.impl, m.time_limit_s)
    assert message is not None, f"{m.name} passed test_{m.exercise}"
    assert m.hint in message, f"{m.name}: expected the hint {m.hint!r}, got:\n{message}"
    assert printed == ""


@pytest.mark.parametrize("m", ALTERNATIVES, ids=_id)
def test_correct_alternative_passes(m):
    message, printed = grade(m.exercise, m.impl)
    assert message is None, f"{m.name} should pass test_{m.exercise}:\n{message}"
    passed = f"All tests in `test_{m.exercise}` passed!\n"
    if m.note is None:
        assert printed == passed
    else:  # issue 27: a correct answer that is not what the lesson asks for gets a note, not a failure
        assert printed.startswith(passed + "Note: ") and m.note in printed, printed


def test_catalogue_covers_every_exercise():
    by_exercise = catalogue_by_exercise()
    assert sorted(by_exercise) == sorted(REFERENCE)
    for exercise, (wrong, right) in by_exercise.items():
        assert len(wrong) >= 3, f"{exercise}: only {len(wrong)} mutants"
        assert len(right) >= 2, f"{exercise}: only {len(right)} correct alternatives"
    assert len({_id(m) for m in MUTANTS + ALTERNATIVES}) == len(MUTANTS) + len(ALTERNATIVES)


def test_solutions_reexport_the_stage_modules():
    homes = (attribution, case_study, interventions, nodes, pruning, replacement)
    for name in solutions.__all__:
        obj = getattr(solutions, name)
        if callable(obj):
            assert any(getattr(mod, name, None) is obj for mod in homes) or name == "format_prompt", name
    assert solutions.START_POSN == 4


# -- the model=..., transcoders=... path, on a second world the grader has never seen --------------------


@pytest.mark.parametrize("exercise", sorted(REFERENCE))
def test_reference_passes_on_a_passed_model(exercise, second_world):
    model, tcs = second_world
    before, hooks = fingerprint(model, tcs), hook_total(model)
    message, printed = grade(exercise, REFERENCE[exercise], model=model, transcoders=tcs)
    assert message is None, message
    assert printed == f"All tests in `test_{exercise}` passed!\n"
    assert hook_total(model) == hooks
    assert all(torch.equal(a, b) for a, b in zip(before, fingerprint(model, tcs)))


@pytest.mark.parametrize("m", MUTANTS, ids=_id)
def test_mutant_fails_on_a_passed_model(m, second_world):
    model, tcs = second_world
    hooks = hook_total(model)
    message, _ = grade(m.exercise, m.impl, m.time_limit_s, model=model, transcoders=tcs)
    assert message is not None and m.hint in message, message
    assert hook_total(model) == hooks


@pytest.mark.parametrize("m", ALTERNATIVES, ids=_id)
def test_correct_alternative_passes_on_a_passed_model(m, second_world):
    model, tcs = second_world
    message, _ = grade(m.exercise, m.impl, model=model, transcoders=tcs)
    assert message is None, message


def test_passed_model_in_float64_and_bfloat16():
    """Tolerances follow the model's dtype: the reference passes, a real mistake still fails."""
    for dtype in (torch.float64, torch.bfloat16):
        with one_thread():
            if dtype == torch.bfloat16:
                model, tcs = make_toy_world(seed=2)
                model = model.to(dtype)
                model.cfg.dtype = dtype
                tcs = {layer: tc.to(dtype) for layer, tc in tcs.items()}
            else:
                model, tcs = make_toy_world(seed=2, dtype=dtype)
        for exercise in (
            "transcoder_replacement_hooks",
            "build_intermediate_nodes",
            "compute_adjacency_matrix",
        ):
            message, _ = grade(exercise, REFERENCE[exercise], model=model, transcoders=tcs)
            assert message is None, f"{dtype} {exercise}: {message}"
        wrong = next(m for m in MUTANTS if m.exercise == "compute_adjacency_matrix")
        message, _ = grade(wrong.exercise, wrong.impl, model=model, transcoders=tcs)
        assert message is not None and wrong.hint in message, message


# -- misuse and robustness ------------------------------------------------------------------------------


def test_misuse_gives_a_plain_message():
    message, _ = grade("compute_influence", 42)
    assert "Pass the function itself" in message
    message, _ = grade("transcoder_replacement_hooks", solutions.compute_influence)
    assert "Pass the class itself" in message
    message, _ = grade("prune_nodes", solutions.prune_nodes, model=object())
    assert "Pass both `model=` and `transcoders=`" in message


def test_stray_hooks_on_a_passed_model_are_reported_not_trusted(second_world):
    model, tcs = second_world
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: 2 * x)
    try:
        message, _ = grade(
            "compute_adjacency_matrix", solutions.compute_adjacency_matrix, model=model, transcoders=tcs
        )
    finally:
        model.reset_hooks()
    assert "already carries 1 hooks" in message


def test_learner_exception_is_reported_with_its_line():
    def compute_influence(adjacency_matrix, logit_weights, n_layers):
        scale = adjacency_matrix.shape[0] / 0.0
        return torch.zeros(3)[int(scale)]

    message, _ = grade("compute_influence", compute_influence)
    assert "compute_influence raised" in message
    assert "line" in message and "scale = adjacency_matrix.shape[0] / 0.0" in message


def test_failure_traceback_is_short():
    """The AssertionError carries no chained exception from the autograder's internals."""
    with pytest.raises(AssertionError) as info, contextlib.redirect_stderr(io.StringIO()):
        autograder.test_compute_influence(lambda *args: None)
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert "should be a torch.Tensor, got NoneType" in str(info.value)


def test_hooks_leaked_before_a_crash_are_cleaned(grader_world):
    model = grader_world.model

    def compute_adjacency_matrix(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
        tc_hooks.install()
        model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: x)
        model.blocks[0].mlp.register_forward_hook(lambda *args: None)  # a raw PyTorch hook, too
        raise RuntimeError("boom")

    message, _ = grade("compute_adjacency_matrix", compute_adjacency_matrix)
    assert "raised RuntimeError: boom" in message
    assert not model.blocks[0].mlp._forward_hooks
    # leaves_no_trace checks the TransformerLens hooks


def test_grad_disabled_globally_like_arena_notebooks():
    """ARENA notebooks often run torch.set_grad_enabled(False): tests must still work."""
    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        for exercise in ("transcoder_replacement_hooks", "compute_adjacency_matrix"):
            assert grade(exercise, REFERENCE[exercise])[0] is None
        cached = next(m for m in MUTANTS if m.name == "HooksCachedInput")
        message, _ = grade(cached.exercise, cached.impl)
        assert cached.hint in message
    finally:
        torch.set_grad_enabled(previous)


# -- hygiene: a side effect fails its own test, names what changed, is undone, and never reaches the
# next test --


def _mutant(name: str):
    return next(m for m in MUTANTS if m.name == name)


def _clean(world) -> bool:
    return hygiene._new_hooks(world.model, ({}, set()), world.transcoders) == 0


def test_demeaning_W_U_in_place_fails_its_own_test_and_the_next_passes():
    world = worlds._get_world(None, None)
    model, W_U = world.model, world.model.unembed.W_U
    before = W_U.detach().clone()
    m = _mutant("salient_demeans_W_U_in_place")
    message, _ = grade(m.exercise, m.impl)
    assert m.hint in message and "restored" in message
    assert model.unembed.W_U is W_U and torch.equal(W_U, before)
    for exercise in ("compute_salient_logits", "compute_adjacency_matrix"):
        assert grade(exercise, REFERENCE[exercise])[0] is None, exercise


@pytest.mark.parametrize("how", ["reassigned", "data"])
def test_other_ways_of_changing_a_weight_are_caught_and_undone(how):
    world = worlds._get_world(None, None)
    W_U = world.model.unembed.W_U
    before = W_U.detach().clone()

    def compute_salient_logits(model, logits, n_output_nodes=3):
        if how == "reassigned":
            model.unembed.W_U = torch.nn.Parameter(model.W_U - model.W_U.mean(dim=-1, keepdim=True))
        else:
            model.W_U.data -= model.W_U.data.mean(dim=-1, keepdim=True)
        return solutions.compute_salient_logits(model, logits, n_output_nodes)

    message, _ = grade("compute_salient_logits", compute_salient_logits)
    assert "changed model.unembed.W_U" in message, message
    assert world.model.unembed.W_U is W_U and torch.equal(W_U, before)
    assert grade("compute_salient_logits", REFERENCE["compute_salient_logits"])[0] is None


@pytest.mark.parametrize(
    "name, site",
    [
        ("salient_leaves_a_hook", "blocks.1.hook_resid_post"),
        ("embeddings_leave_a_torch_hook", "blocks.0.mlp"),
        ("intermediate_leaves_a_transcoder_hook", "transcoders[1].hook_sae_acts_post"),
    ],
)
def test_a_leaked_hook_fails_its_own_test_and_the_next_passes(name, site):
    m = _mutant(name)
    message, _ = grade(m.exercise, m.impl)
    assert f"left 1 hook on the model (1 on {site})" in message, message
    world = worlds._get_world(None, None)
    assert _clean(world)
    for exercise in ("transcoder_replacement_hooks", "compute_adjacency_matrix"):
        assert grade(exercise, REFERENCE[exercise])[0] is None, exercise


def test_a_leaked_hook_would_break_the_next_test():
    """The control for the test above: the same hook left on the grader's model (bypassing the clean-up) makes
    a correct adjacency fail, as issue 12 saw ("50 rows are all zero")."""
    world = worlds._get_world(None, None)
    world.model.add_hook("blocks.1.hook_resid_post", lambda x, hook: torch.zeros_like(x))
    try:
        message, _ = grade("compute_adjacency_matrix", REFERENCE["compute_adjacency_matrix"])
    finally:
        world.model.reset_hooks()
    assert message is not None and "rows are all zero" in message


def test_an_input_edited_in_place_fails_and_the_world_is_rebuilt():
    m = _mutant("embeddings_scale_the_cache")
    message, _ = grade(m.exercise, m.impl)
    assert m.hint in message, message
    world = worlds._get_world(None, None)
    _, cache = world.model.run_with_cache(world.tokens, names_filter="blocks.0.hook_resid_pre")
    assert torch.equal(world.cache["blocks.0.hook_resid_pre"], cache["blocks.0.hook_resid_pre"])
    assert grade("build_embedding_nodes", REFERENCE["build_embedding_nodes"])[0] is None


def test_an_endless_loop_is_stopped_and_leaves_the_model_clean():
    def compute_salient_logits(model, logits, n_output_nodes=3):
        model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: 2 * x)
        while True:
            pass

    start = time.perf_counter()
    message, _ = grade("compute_salient_logits", compute_salient_logits, time_limit_s=1.0)
    assert time.perf_counter() - start < 30
    assert "time limit of 1 s" in message and "`while True:`" in message, message
    assert "left 1 hook on the model (1 on blocks.0.hook_resid_pre)" in message
    assert _clean(worlds._get_world(None, None))
    assert grade("compute_salient_logits", REFERENCE["compute_salient_logits"])[0] is None


def test_a_loop_that_cancels_the_alarm_is_still_stopped():
    """Issue 27: the old limit was a SIGALRM the learner's own code could cancel, then loop forever."""
    import signal

    def compute_salient_logits(model, logits, n_output_nodes=3):
        if hasattr(signal, "setitimer"):
            with contextlib.suppress(ValueError):  # off the main thread signal() refuses: nothing to cancel
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, signal.SIG_IGN)
        while True:
            pass

    message, _ = grade("compute_salient_logits", compute_salient_logits, time_limit_s=1.0)
    assert "Your `compute_salient_logits`" in message and "time limit of 1 s" in message, message
    assert "was stopped" in message and "`while True:`" in message, message
    assert grade("compute_salient_logits", REFERENCE["compute_salient_logits"])[0] is None


def test_the_time_limit_holds_for_a_test_called_from_a_worker_thread():
    """Issue 27: off the main thread there was no limit at all, so a function that sleeps forever hung the
    caller. Now the caller gets the failure; the sleep, blocked in C, ends in the background."""
    import threading

    def compute_influence(adjacency_matrix, logit_weights, n_layers):
        time.sleep(3600)

    done = []
    thread = threading.Thread(
        target=lambda: done.append(grade("compute_influence", compute_influence, time_limit_s=0.5)),
        daemon=True,
    )
    with one_thread():
        thread.start()
        thread.join(timeout=120)
    assert done, "the test called from a worker thread was never stopped"
    message = done[0][0]
    assert "Your `compute_influence`" in message and "time limit of 0.5 s" in message, message
    assert "still running in the background" in message, message
    ok = []
    thread = threading.Thread(
        target=lambda: ok.append(grade("compute_influence", REFERENCE["compute_influence"], time_limit_s=30))
    )
    thread.start()
    thread.join(timeout=120)
    assert ok and ok[0][0] is None, ok


def test_a_failure_renders_as_the_message_and_the_learners_line():
    """IPython shows `_render_traceback_()` instead of the traceback: our frames must not appear."""
    try:
        autograder.test_compute_influence(lambda *args: None)  # the learner's line
    except AssertionError as e:
        assert isinstance(e, autograder.AutograderFailure)
        rendered = "\n".join(e._render_traceback_())
    assert "autograder.test_compute_influence(lambda *args: None)" in rendered
    assert "should be a torch.Tensor, got NoneType" in rendered
    assert "running.py" not in rendered and "part3_attribution_graphs" not in rendered


def test_on_a_model_too_large_to_copy_a_changed_weight_is_reported_and_the_world_dropped(monkeypatch):
    """Above COPY_LIMIT the harness keeps no copy: it cannot undo the change, says so, and rebuilds its
    world."""
    with one_thread():
        model, tcs = make_toy_world(seed=3)
    W_U = model.unembed.W_U
    before = W_U.detach().clone()
    monkeypatch.setattr(hygiene, "COPY_LIMIT", 0)
    m = _mutant("salient_demeans_W_U_in_place")
    message, _ = grade(m.exercise, m.impl, model=model, transcoders=tcs)
    assert m.hint in message and "reload the model" in message, message
    assert worlds._REAL is None  # the next test rebuilds its references from the model as it now is
    assert not torch.equal(W_U, before)  # nothing to restore from: the learner reloads
    with torch.no_grad():
        W_U.copy_(before)
    assert (
        grade("compute_salient_logits", REFERENCE["compute_salient_logits"], model=model, transcoders=tcs)[0]
        is None
    )


def test_a_passed_model_changed_between_tests_is_not_blamed_on_the_next(second_world):
    model, tcs = second_world
    assert (
        grade("compute_salient_logits", REFERENCE["compute_salient_logits"], model=model, transcoders=tcs)[0]
        is None
    )
    W_U = model.unembed.W_U
    before = W_U.detach().clone()
    try:
        with torch.no_grad():
            W_U.data.mul_(1.5)  # the learner's own cell, between two tests (no version bump)
        message, _ = grade("compute_influence", REFERENCE["compute_influence"], model=model, transcoders=tcs)
        assert message is None, message
        assert torch.equal(W_U, before * 1.5)  # left as the learner made it
    finally:
        with torch.no_grad():
            W_U.copy_(before)


# Issue 27: inputs and the cached worlds left bit-identical, whatever learner code does to them.


def test_reversing_the_graphs_nodes_fails_and_does_not_leak():
    world = worlds._get_world(None, None)
    nodes = list(world.graph.nodes)

    def strongest_path(result):
        answer = case_study.strongest_path(result)
        result.graph.nodes.reverse()
        return answer

    message, _ = grade("strongest_path", strongest_path)
    assert "changed its input result.graph.nodes in place" in message, message
    assert "restored" in message
    assert world.graph.nodes == nodes and all(a is b for a, b in zip(world.graph.nodes, nodes))
    for exercise in ("strongest_path", "prepare_backward_batches"):
        assert grade(exercise, REFERENCE[exercise])[0] is None, exercise


def test_popping_a_transcoder_fails_and_does_not_leak():
    world = worlds._get_world(None, None)
    layers = dict(world.transcoders)

    def build_intermediate_nodes(transcoders, *args, **kwargs):
        answer = solutions.build_intermediate_nodes(transcoders, *args, **kwargs)
        transcoders.pop(max(transcoders))
        return answer

    message, _ = grade("build_intermediate_nodes", build_intermediate_nodes)
    assert "changed its input transcoders in place" in message, message
    assert world.transcoders == layers
    assert grade("compute_adjacency_matrix", REFERENCE["compute_adjacency_matrix"])[0] is None


def test_the_planted_world_is_guarded_too():
    """swap_group also runs on the planted world, which the grader loads itself: a weight halved there and a
    transcoder popped are reported and undone."""
    from part3_attribution_graphs.tests import swap_group as grader

    model, tcs, _, _ = grader._planted_world()
    W_dec, layers = tcs[0].W_dec.detach().clone(), dict(tcs)

    def swap_group(model, transcoders, prompt_a, prompt_b, latents):
        answer = solutions.swap_group(model, transcoders, prompt_a, prompt_b, latents)
        if transcoders is tcs:  # only on the planted world
            with torch.no_grad():
                transcoders[0].W_dec.mul_(0.5)
            transcoders.pop(max(transcoders))
        return answer

    message, _ = grade("swap_group", swap_group)
    assert "changed transcoders[0].W_dec" in message and "restored" in message, message
    assert "changed its input transcoders in place" in message, message
    assert torch.equal(tcs[0].W_dec, W_dec) and tcs == layers
    assert grade("swap_group", REFERENCE["swap_group"])[0] is None


def test_swap_group_names_its_prompts_by_what_differs():
    """The last 30 characters of the two toy prompts are the same: the label shows the words that differ."""
    m = _mutant("swap_adds")
    message, _ = grade(m.exercise, m.impl)
    assert "prompt A '...opposite of small?" in message and "prompt B '...opposite of large?" in message, (
        message
    )


def test_swap_group_grades_planted_pairs_chosen_without_the_reference():
    """Issue 24: the planted pairs were those the reference flips, so a swap that only forces B's answer
    passed. Now every pair of a fixed rule is graded against the reference's logits."""
    from part3_attribution_graphs.tests import swap_group as grader
    from part3_attribution_graphs.worlds.planted import planted_facts

    _, tcs, found, _ = grader._planted_world()
    pairs = grader._planted_pairs(planted_facts("two_hop"), found)
    assert len({a.intermediate for a, _ in pairs}) == len(pairs) >= 2
    assert all(a.split == "heldout" and a.intermediate != b.intermediate for a, b in pairs)
    answer_of = {f.prompt: f.answer for f in planted_facts("two_hop")}

    def swap_group(model, transcoders, prompt_a, prompt_b, latents):
        logits = solutions.swap_group(model, transcoders, prompt_a, prompt_b, latents)
        if transcoders is tcs:  # force B's answer, as if every swap flipped
            logits = logits.clone()
            logits[model.to_single_token(answer_of[prompt_b])] = logits.max() + 1
        return logits

    message, _ = grade("swap_group", swap_group)
    assert message is not None and "your logits differ from the reference swap's" in message, message


def test_no_planted_pair_graded_is_a_failure(monkeypatch):
    from part3_attribution_graphs.tests import swap_group as grader

    monkeypatch.setattr(grader, "_planted_pairs", lambda facts, found: [])
    message, _ = grade("swap_group", REFERENCE["swap_group"])
    assert message is not None and "could not grade swap_group on the planted world" in message


def test_learner_code_sees_the_callers_torch_modes():
    """Learner code runs on a thread of its own; torch keeps grad mode and the default device per thread, so
    the grader hands over the caller's."""
    with torch.no_grad():
        assert running._call_with_limit(torch.is_grad_enabled, (), 30) is False
    torch.set_default_device("meta")
    try:
        assert running._call_with_limit(torch.get_default_device, (), 30) == torch.device("meta")
    finally:
        torch.set_default_device(None)
