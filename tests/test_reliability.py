"""Reliability round 3 (issue 27): stale or tampered clean runs and results, threads, and the tools and the
CLI writing into the user's folders. Each case ends in a clear error or the correct result, and the model
comes out of it bit-identical (the hostile suite's fixture, imported).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import test_hostile
import torch

from part3_attribution_graphs import __main__ as cli
from part3_attribution_graphs import interventions
from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.interventions import (
    ablation_effects,
    clean_run,
    intervene,
    most_influential_latents,
    run_with_latent_set,
)
from part3_attribution_graphs.result import AttributionResult
from part3_attribution_graphs.tools import ground_truth, train_planted
from part3_attribution_graphs.worlds.gemma import START_POSN

PROMPT, EDIT = test_hostile.PROMPT, test_hostile.EDIT
# The hostile suite's fixtures: the toy world, and the check that every case leaves its model bit-identical.
world, pristine = test_hostile.world, test_hostile.pristine
model_left_bit_identical = test_hostile.model_left_bit_identical


@pytest.fixture(scope="module")
def graph(world):
    model, transcoders = world
    return attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)


def _scaled(param: torch.Tensor, factor: float):
    """Scale a weight in place for the block, then put it back bit-identically."""

    class Scaled:
        def __enter__(self):
            self.before = param.detach().clone()
            with torch.no_grad():
                param.mul_(factor)

        def __exit__(self, *exc):
            with torch.no_grad():
                param.copy_(self.before)

    return Scaled()


# --- CleanRun: refused once stale ------------------------------------------------------------------


def test_error_clean_run_reused_after_the_models_weights_changed_in_place(world):
    model, transcoders = world
    run = clean_run(model, transcoders, PROMPT)
    with _scaled(model.blocks[0].mlp.W_in, 3.0), pytest.raises(ValueError, match="stale CleanRun: the model"):
        intervene(model, transcoders, run, [EDIT])


def test_error_clean_run_reused_after_a_transcoders_weights_changed(world):
    model, transcoders = world
    run = clean_run(model, transcoders, PROMPT)
    with (
        _scaled(transcoders[1].W_dec, 2.0),
        pytest.raises(ValueError, match="transcoder 1's weights changed"),
    ):
        intervene(model, transcoders, run, [EDIT])


@pytest.mark.parametrize("how", ["edited in place", "replaced"])
def test_error_clean_run_whose_acts_were_edited(world, how):
    model, transcoders = world
    run = clean_run(model, transcoders, PROMPT)
    if how == "edited in place":
        run.acts[1].mul_(2)
    else:
        run.acts[1] = run.acts[1] * 2
    with pytest.raises(ValueError, match=r"stale CleanRun: its acts\[1\]"):
        intervene(model, transcoders, run, [EDIT])


def test_error_clean_run_rebuilt_with_other_tokens(world):
    model, transcoders = world
    run = clean_run(model, transcoders, PROMPT)
    other = dataclasses.replace(run, tokens=model.to_tokens(PROMPT.replace("small", "large")))
    with pytest.raises(ValueError, match="stale CleanRun: its tokens"):
        intervene(model, transcoders, other, [EDIT])


def test_error_a_clean_run_built_by_hand_is_refused(world):
    model, transcoders = world
    run = clean_run(model, transcoders, PROMPT)
    fields = {f.name: getattr(run, f.name) for f in dataclasses.fields(run) if f.name != "made_from"}
    with pytest.raises(ValueError, match="clean_run did not make"):
        intervene(model, transcoders, interventions.CleanRun(**fields), [EDIT])


def test_correct_a_fresh_clean_run_gives_the_prompts_result(world):
    model, transcoders = world
    run = clean_run(model, transcoders, PROMPT)
    assert torch.equal(
        intervene(model, transcoders, run, [EDIT]).logits,
        intervene(model, transcoders, PROMPT, [EDIT]).logits,
    )


def test_error_run_with_latent_set_names_a_clean_run(world):
    model, transcoders = world
    run = clean_run(model, transcoders, PROMPT)
    with pytest.raises(TypeError, match="not a CleanRun: pass run.tokens"):
        run_with_latent_set(model, transcoders[1], run, 5, 3, 0.0)


# --- Results: what they were made from ---------------------------------------------------------------


def test_error_a_result_reused_after_the_models_weights_changed(world, graph):
    model, transcoders = world
    top = most_influential_latents(graph, 2)
    with (
        _scaled(model.blocks[1].mlp.W_out, 2.0),
        pytest.raises(ValueError, match="the model's weights differ"),
    ):
        ablation_effects(model, transcoders, graph, top)


def _tampered(graph, tmp_path, change) -> Path:
    path = graph.save(tmp_path / "graph.pt")
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    return path


def test_error_a_file_whose_adjacency_was_scaled_is_refused(graph, tmp_path):
    path = _tampered(graph, tmp_path, lambda p: p["adjacency_matrix"].mul_(2))
    with pytest.raises(ValueError, match="differ from what attribute computed"):
        AttributionResult.load(path)


def test_error_a_file_with_no_world_is_refused(graph, tmp_path):
    path = _tampered(graph, tmp_path, lambda p: p.update(world=None))
    with pytest.raises(ValueError, match="does not record what it was made from"):
        AttributionResult.load(path)


def test_error_a_result_with_no_world_is_refused_with_a_model(world, graph):
    model, transcoders = world
    with pytest.raises(ValueError, match="does not record the model and transcoders"):
        ablation_effects(model, transcoders, dataclasses.replace(graph, world=None), [])


def test_warning_a_file_of_the_previous_format_loads_with_a_word(graph, tmp_path):
    def as_version_1(payload):
        payload["version"] = 1
        payload["world"] = {k: v for k, v in payload["world"].items() if k not in ("model", "contents")}

    path = _tampered(graph, tmp_path, as_version_1)
    with pytest.warns(UserWarning, match="format version 1.*cannot be detected"):
        loaded = AttributionResult.load(path)
    assert torch.equal(loaded.adjacency_matrix, graph.adjacency_matrix)


def test_correct_a_saved_result_loads_and_fits_its_world(world, graph, tmp_path):
    model, transcoders = world
    loaded = AttributionResult.load(graph.save(tmp_path / "graph.pt"))
    predicted, measured = ablation_effects(model, transcoders, loaded, most_influential_latents(loaded, 2))
    assert torch.isfinite(measured).all()


@pytest.mark.parametrize("path", [None, 3, ""])
def test_error_load_of_no_path_says_what_to_pass(path):
    with pytest.raises(TypeError, match="path must be the file a result was saved to"):
        AttributionResult.load(path)


# --- Threads -------------------------------------------------------------------------------------------


def _beside_intervene(model, transcoders, prompt, edit, other, monkeypatch) -> tuple:
    """Thread A intervenes and pauses inside its hooks; thread B runs `other()` meanwhile (it may wait for A
    to finish). Returns (A's result, B's result or exception)."""
    inside, b_started = threading.Event(), threading.Event()
    real_set, calls = interventions._set, []

    def paused_set(*args):
        calls.append(1)
        if len(calls) == 1:  # A's own edit: hold A inside its hooks until B has started
            inside.set()
            assert b_started.wait(60)
            time.sleep(0.5)  # let B reach the model (it then waits at the gate, or runs with A's hooks)
        return real_set(*args)

    monkeypatch.setattr(interventions, "_set", paused_set)
    outcome: dict = {}
    a = threading.Thread(target=lambda: outcome.update(a=intervene(model, transcoders, prompt, [edit])))
    a.start()
    assert inside.wait(60)

    def run_b():
        b_started.set()
        try:
            outcome["b"] = other()
        except Exception as err:  # noqa: BLE001 - returned for the test to inspect
            outcome["b"] = err

    b = threading.Thread(target=run_b)
    b.start()
    a.join(120)
    b.join(120)
    return outcome["a"], outcome["b"]


def test_correct_a_plain_forward_beside_intervene_gets_the_clean_logits(world, monkeypatch):
    """A plain `model(tokens)` in another thread must not run with intervene's hooks."""
    model, transcoders = world
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        clean = model(tokens)

    def plain():
        with torch.no_grad():
            return model(tokens)

    ran, plain_logits = _beside_intervene(model, transcoders, tokens, (1, 5, 3, 50.0), plain, monkeypatch)
    assert not torch.equal(ran.logits, clean)  # the edit does move the logits
    assert torch.equal(plain_logits, clean), "a plain forward ran with another thread's intervention hooks"


def test_correct_land_latents_beside_intervene(planted_world, monkeypatch):
    from part3_attribution_graphs.worlds import planted

    model, transcoders = planted_world
    facts = planted.planted_facts("two_hop")[:24]
    alone = planted.land_latents(model, transcoders, facts)
    edit = (1, 3, 0, 5.0)
    _, found = _beside_intervene(
        model,
        transcoders,
        facts[0].prompt,
        edit,
        lambda: planted.land_latents(model, transcoders, facts),
        monkeypatch,
    )
    if isinstance(found, Exception):  # a guarded land_latents may refuse to run beside intervene
        assert isinstance(found, RuntimeError) and "already running on this model" in str(found), found
    else:
        assert found == alone


def test_correct_two_models_sharing_a_tokenizer_in_two_threads(world):
    """Two models with one tokenizer, each in its own thread: no "Already borrowed" from the tokenizer."""
    from part3_attribution_graphs.toy import make_toy_world

    model, transcoders = world
    twin, twin_tcs = make_toy_world(seed=1)
    twin.tokenizer = model.tokenizer
    errors: list = []
    start = threading.Barrier(2)

    def run(m, tcs):
        start.wait()
        for i in range(40):
            try:
                intervene(m, tcs, PROMPT + " big" * (i % 5), [EDIT])
            except Exception as err:  # noqa: BLE001 - every outcome is inspected below
                errors.append(err)

    threads = [threading.Thread(target=run, args=args) for args in ((model, transcoders), (twin, twin_tcs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]


def test_correct_ctrl_c_inside_attribute_leaves_the_model_clean_and_free(world, monkeypatch):
    from part3_attribution_graphs import attribution, guard

    model, transcoders = world

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(attribution, "prepare_backward_batches", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64)
    assert id(model) not in guard._busy
    assert attribute(model, transcoders, PROMPT, start_posn=START_POSN, batch_size=64) is not None


# --- The CLI's staging ------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _cli_args(out: Path, *more: str) -> list[str]:
    return ["--world", "toy", "--out", str(out), "--batch-size", "64", "--no-examples", *more]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "graph"
    cli.main(_cli_args(out))
    return out, _files(out)


def _copy(first_run, tmp_path) -> Path:
    import shutil

    out = tmp_path / "graph"
    shutil.copytree(first_run[0], out)
    return out


_SIGNAL_DURING_RUN = """
import os, signal, sys
from part3_attribution_graphs import __main__ as cli, utils
def signalled(*args, **kwargs):  # nodes.json and graph.pt are staged by now
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    raise AssertionError("still running after the signal")
utils.create_attribution_dashboard = signalled
cli.main(sys.argv[2:])
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_error_a_signal_during_the_run_cleans_the_staging_folder(first_run, tmp_path, name):
    out = _copy(first_run, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_DURING_RUN, name, *_cli_args(out, "--top-k", "3")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 128 + getattr(signal, name), proc.stderr[-2000:]
    assert [p.name for p in out.iterdir() if p.is_dir()] == [], "the staging folder was left behind"
    assert _files(out) == first_run[1]


def test_error_a_commit_that_fails_half_way_puts_the_old_set_back(first_run, tmp_path, monkeypatch, capsys):
    from part3_attribution_graphs import staging

    out = _copy(first_run, tmp_path)
    real, moves = staging._move, []

    def failing(src, dst):
        moves.append(dst)
        if len(moves) == 6:  # the old set is aside and some new files are in
            raise PermissionError(1, "Operation not permitted", str(dst))
        real(src, dst)

    monkeypatch.setattr(staging, "_move", failing)
    with pytest.raises(SystemExit) as info:
        cli.main(_cli_args(out, "--top-k", "3"))
    assert info.value.code == 1 and len(moves) == 6
    assert _files(out) == first_run[1], "a mix of new and old files"
    assert [p.name for p in out.iterdir() if p.is_dir()] == []


def test_error_a_users_file_saved_during_the_run_is_not_overwritten(first_run, tmp_path, monkeypatch, capsys):
    from part3_attribution_graphs import utils

    out = tmp_path / "fresh"
    real = utils.create_attribution_dashboard

    def user_saves_meanwhile(*args, **kwargs):
        (out / "index.html").write_text("my page")
        return real(*args, **kwargs)

    monkeypatch.setattr(utils, "create_attribution_dashboard", user_saves_meanwhile)
    with pytest.raises(SystemExit) as info:
        cli.main(_cli_args(out))
    assert info.value.code == 1
    assert "index.html appeared or changed there while this program ran" in capsys.readouterr().err
    assert (out / "index.html").read_text() == "my page"
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]


def test_correct_interventions_beyond_the_graphs_latents_are_capped_with_a_word(tmp_path, capsys):
    short = ("--no-dashboard", "--top-k", "1", "--user", "small?", "--response", "large")  # few latents
    summary = cli.main(_cli_args(tmp_path / "g", *short, "--interventions", "1000000"))
    err = capsys.readouterr().err
    assert "--interventions 1000000: the graph has" in err and "are ablated" in err
    nodes = json.loads((tmp_path / "g" / "nodes.json").read_text())["nodes"]
    n_latents = sum(n["node_type"] == "latent" for n in nodes)
    assert sum("ablation" in n for n in nodes) == n_latents and "interventions" in summary


# --- The tools ---------------------------------------------------------------------------------------


def _users_folder(tmp_path: Path) -> Path:
    out = tmp_path / "mine"
    (out / "thesis").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "thesis" / "ch1.tex").write_text("chapter one")
    return out


def test_correct_write_world_keeps_the_users_files(tmp_path):
    out = _users_folder(tmp_path)
    train_planted.write_world(out, {"a": torch.zeros(2)}, {"0.b": torch.ones(1)}, {"k": 1})
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "thesis" / "ch1.tex").read_text() == "chapter one"
    assert {"model.safetensors", "transcoders.safetensors", "meta.json"} <= {p.name for p in out.iterdir()}
    train_planted.write_world(out, {"a": torch.ones(2)}, {"0.b": torch.ones(1)}, {"k": 2})  # ours: replaced
    assert json.loads((out / "meta.json").read_text()) == {"k": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing left beside it
    assert not [p for p in out.iterdir() if p.name.startswith(".partial-")]


def test_error_write_world_does_not_replace_a_users_meta_json_without_force(tmp_path):
    from part3_attribution_graphs import staging

    out = _users_folder(tmp_path)
    (out / "meta.json").write_text("mine")
    with pytest.raises(staging.OutputError, match="already holds meta.json.*--force"):
        train_planted.write_world(out, {"a": torch.zeros(2)}, {"0.b": torch.ones(1)}, {"k": 1})
    assert (out / "meta.json").read_text() == "mine"
    train_planted.write_world(out, {"a": torch.zeros(2)}, {"0.b": torch.ones(1)}, {"k": 1}, force=True)
    assert json.loads((out / "meta.json").read_text()) == {"k": 1}


def test_error_train_planted_out_a_file_is_refused_before_training(tmp_path, capsys, monkeypatch):
    target = tmp_path / "afile.txt"
    target.write_text("keep me")
    monkeypatch.setattr(
        train_planted, "train_world", lambda *a: pytest.fail("trained before --out was checked")
    )
    with pytest.raises(SystemExit) as info:
        train_planted.main(["--out", str(target)])
    assert info.value.code == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


def test_correct_train_planted_main_into_a_users_folder(tmp_path, monkeypatch):
    out = _users_folder(tmp_path)
    state = ({"a": torch.zeros(2)}, {"0.b": torch.ones(1)}, {"k": 1})
    monkeypatch.setattr(train_planted, "train_world", lambda *a: state)
    train_planted.main(["--out", str(out), "--threads", str(torch.get_num_threads())])  # keep torch's setting
    assert (out / "notes.txt").read_text() == "my notes" and (out / "thesis" / "ch1.tex").exists()
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("tool", "args", "complaint"),
    [
        (train_planted, ["--l0-coeff", "nan"], "argument --l0-coeff: must be a finite number"),
        (train_planted, ["--l0-coeff", "-1"], "argument --l0-coeff: must be in [0, inf]"),
        (train_planted, ["--tc-steps", "0"], "argument --tc-steps: must be at least 1"),
        (train_planted, ["--weight-decay", "-100"], "argument --weight-decay: must be in [0, inf]"),
        (train_planted, ["--model-steps", "-5"], "argument --model-steps: must be at least 1"),
        (train_planted, ["--threads", "0"], "argument --threads: must be at least 1"),
        (ground_truth, ["--graphs", "0"], "argument --graphs: must be at least 1"),
        (ground_truth, ["--graphs", "-1"], "argument --graphs: must be at least 1"),
        (ground_truth, ["--pairs", "-1"], "argument --pairs: must be at least 1"),
        (ground_truth, ["--pairs", "0"], "argument --pairs: must be at least 1"),
    ],
)
def test_error_a_tools_bad_number_is_a_usage_error_before_any_work(
    tool, args, complaint, capsys, monkeypatch
):
    monkeypatch.setattr(train_planted, "train_world", lambda *a: pytest.fail("trained with a bad flag"))
    monkeypatch.setattr(ground_truth, "measure", lambda *a, **k: pytest.fail("measured with a bad flag"))
    with pytest.raises(SystemExit) as info:
        tool.main(args)
    assert info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_the_staging_folder_is_hidden_and_inside_out(tmp_path):
    from part3_attribution_graphs import staging

    folder = staging.OutputFolder(tmp_path / "o", ("a.txt",), ".list.json")
    folder.check(("a.txt",))
    with folder.staged() as stage:
        assert stage.parent == tmp_path / "o" and stage.name.startswith(".partial-")
        (stage / "a.txt").write_text("x")
        folder.commit(stage, ["a.txt"])
    assert sorted(os.listdir(tmp_path / "o")) == [".list.json", "a.txt"]
