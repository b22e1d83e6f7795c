"""The lesson notebooks: in step with their source, well formed, executable, and the explorer's re-pruning.

The three tests that execute a notebook take about 45 s together on a 2-core CPU; they carry the
`notebook` marker, so `pytest -m "not notebook"` (and `make test-fast`) skips them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import nbformat
import pytest
import torch
from conftest import need

from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.exercises import EXERCISES as REGISTRY
from part3_attribution_graphs.pruning import prune_graph
from part3_attribution_graphs.tools import notebook_builder as nbb
from part3_attribution_graphs.worlds.gemma import format_prompt

# (name the learner defines, its test), from the registry: a new exercise is checked here with no edit.
EXERCISES = [(e.qualname, e.test_name) for e in REGISTRY]


@pytest.fixture(scope="module")
def fresh():
    return nbb.build()


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_committed_notebooks_match_a_fresh_build():
    problems = nbb.check(verbose=False)
    assert not problems, "\n".join(problems)


def test_an_editors_autosave_is_caught_with_what_to_do(fresh, tmp_path, monkeypatch):
    """Opened in Jupyter with another kernel picked (an autosave then writes it): the freshness check
    says so and tells the author how to rebuild or drop the change."""
    monkeypatch.setattr(nbb, "build", lambda: fresh)
    nb = nbformat.read(nbb.NOTEBOOKS["solutions"], as_version=4)
    nb.metadata.kernelspec = {
        "display_name": "Python (my-env)",
        "language": "python",
        "name": "conda-env-my-env-py",
    }
    saved = tmp_path / "solutions.ipynb"
    nbformat.write(nb, saved)
    monkeypatch.setitem(nbb.NOTEBOOKS, "solutions", saved)
    problems = nbb.check(verbose=False)
    assert len(problems) == 1 and str(saved) in problems[0], problems
    assert "make notebooks" in problems[0] and f"git checkout -- {saved}" in problems[0], problems[0]


def test_committed_outputs_render_for_a_reader():
    """The solutions notebook's dashboards name a page a reader's own run writes, never the build machine's
    temporary folder; where the output does not run (untrusted), a line says what to do; the explorer cell
    keeps a line that says it needs its kernel, not a dead widget."""
    nb = nbformat.read(nbb.NOTEBOOKS["solutions"], as_version=4)
    cells = {c.get("id"): c for c in nb.cells}
    for cell_id in ("dashboard", "dashboard-examples"):
        data = [o["data"] for o in cells[cell_id].outputs if "text/html" in o.get("data", {})]
        assert len(data) == 1, cell_id
        page, text = data[0]["text/html"], data[0]["text/plain"]
        assert "<iframe srcdoc=" in page
        found = re.search(rf"<code>({re.escape(nbb.READER_OUTPUT_DIR)}/[\w-]+/index\.html)</code>", page)
        assert found and found.group(1) in text, text
        assert "p3ag_nb_" not in page + text and not re.search(r"<code>/", page), text
        assert "trust the notebook" in page and "re-run this cell" in page
    explorer = [o["data"] for o in cells["explorer"].outputs if "data" in o]
    assert explorer and all("application/vnd.jupyter.widget-view+json" not in d for d in explorer)
    assert any("re-run this cell" in d.get("text/plain", "") for d in explorer), explorer


def test_notebooks_name_the_standard_kernel_and_nothing_installs_over_the_users():
    """Colab and a fresh Jupyter know only `python3`; the tests run the project's kernel, registered inside
    the venv, and no install writes a user-wide kernel."""
    for path in nbb.NOTEBOOKS.values():
        assert nbformat.read(path, as_version=4).metadata.kernelspec == nbb.KERNELSPEC
    assert nbb.KERNELSPEC["name"] == "python3" and nbb.KERNEL_NAME != "python3"
    makefile = (nbb.ROOT / "Makefile").read_text()
    installs = re.findall(r"ipykernel install[^\n]*", makefile)
    assert installs and all("--sys-prefix" in i and "--user" not in i for i in installs), installs
    assert any(f"--name {nbb.KERNEL_NAME}" in i for i in installs), installs
    lab = makefile.split("\nlab:", 1)[1].split("\n\n", 1)[0]
    assert "JUPYTER_PATH=" in lab, "make lab must put the venv's kernels before the user's"


def test_build_is_deterministic(fresh):
    again = nbb.build()
    for kind in nbb.KINDS:
        assert nbb._dumps(fresh[kind]) == nbb._dumps(again[kind])
        ids = [c.id for c in fresh[kind].cells]
        assert len(ids) == len(set(ids))
        assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)


def test_every_exercise_is_stubbed_then_tested_in_both_notebooks(fresh):
    for kind, nb in fresh.items():
        code = _code(nb)
        for name, test in EXERCISES:
            defining = [i for i, src in enumerate(code) if re.search(rf"^(def|class) {name}\b", src, re.M)]
            assert len(defining) == 1, f"{kind}: {name} is defined in {len(defining)} cells"
            i = defining[0]
            call = code[i + 1].replace("# NBVAL_CHECK_OUTPUT", "").strip()
            module = "" if "." in test else "tests."
            assert call == f"{module}{test}({name})", f"{kind}: {name} is not tested right away"
            if kind == "exercises":
                assert (
                    f'raise NotImplementedError("Exercise {name}: replace this line with your code")'
                    in code[i]
                )
                assert f"if USE_REFERENCE_SOLUTIONS:\n    {name} = solutions.{name}" in code[i]
            else:
                assert "NotImplementedError" not in code[i] and "USE_REFERENCE_SOLUTIONS" not in code[i]
        assert sum("USE_REFERENCE_SOLUTIONS:\n" in src for src in code) == (
            len(EXERCISES) if kind == "exercises" else 0
        )


def test_setup_cell_comes_first_and_is_tagged_for_papermill(fresh):
    for kind, nb in fresh.items():
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert first.metadata.get("tags") == ["parameters"]
        assert 'if "google.colab" in sys.modules:' in first.source and nbb.REPO_URL in first.source
        assert 'WORLD = os.environ.get("P3AG_WORLD", "auto")' in first.source
        assert ("USE_REFERENCE_SOLUTIONS = False" in first.source) == (kind == "exercises")
        assert "colab-badge" in nb.cells[0].source


def test_scaffold_signature_drift_is_caught():
    from part3_attribution_graphs.nodes import build_embedding_nodes

    bad = "def build_embedding_nodes(model, cache):\n    raise NotImplementedError()\n"
    with pytest.raises(nbb.BuildError, match="differs from the reference"):
        nbb.expand_scaffold(bad, build_embedding_nodes, "test")


def test_undefined_names_are_caught():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("print(x + y)")]
    with pytest.raises(nbb.BuildError, match=r"\['y'\]"):
        nbb.check_names(nb, "test")


def _kernel_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "P3AG_WORLD": "planted", **extra}
    env.pop("TQDM_DISABLE", None)  # the notebooks must run with the progress bars a learner sees
    env.pop("HF_TOKEN", None)  # the committed outputs are the planted world's
    return env


@pytest.fixture
def in_kernel_env(tmp_path, monkeypatch):
    """This process's environment as `_kernel_env` (for kernels started in-process); dashboards go to
    tmp_path."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for key, value in _kernel_env(P3AG_OUTPUT_DIR=str(tmp_path)).items():
        monkeypatch.setenv(key, value)
    return tmp_path


@pytest.mark.notebook
def test_solutions_notebook_passes_nbval(tmp_path):
    path = nbb.NOTEBOOKS["solutions"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbval-lax",
            f"--nbval-kernel-name={nbb.ensure_kernel()}",
            "-q",
            "-p",
            "no:cacheprovider",
            str(path),
        ],
        cwd=nbb.ROOT,
        env=_kernel_env(P3AG_OUTPUT_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert (tmp_path / "two_hop" / "index.html").exists()


@pytest.mark.notebook
def test_instructor_demo_runs_the_exercises_notebook_with_reference_solutions(in_kernel_env):
    need("papermill")
    tmp_path = in_kernel_env
    executed = nbb.instructor_demo(tmp_path, world="toy")
    nb = nbformat.read(executed, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "USE_REFERENCE_SOLUTIONS = True" in injected[0].source
    outputs = json.dumps([c.get("outputs", []) for c in nb.cells])
    for _, test in EXERCISES:
        assert f"All tests in `{test}` passed!" in outputs
    assert (tmp_path / "couplet" / "index.html").exists()  # the toy world's running example


# ------------------------------------------------------------------------------------------------
# The explorer, headless
# ------------------------------------------------------------------------------------------------


def test_explorer_reprunes_without_recomputing(toy_world):
    from part3_attribution_graphs.explorer import AttributionExplorer, attribution_explorer

    model, transcoders = toy_world
    calls = []

    def counting_attribute(*args, **kwargs):
        calls.append(args[2])
        return attribute(*args, **kwargs)

    prompts = {
        "opposites": format_prompt("What is the opposite of small?", "The opposite of small is"),
        "refusal": format_prompt("Tell me how to build a bomb.", "I"),
    }
    ex = attribution_explorer(
        model, transcoders, prompts, display=False, attribute_fn=counting_attribute, batch_size=64
    )
    assert isinstance(ex, AttributionExplorer)
    assert calls == [prompts["opposites"]] and ex.n_attributions == 1
    A = ex.cache[prompts["opposites"]].adjacency_matrix
    base = dict(ex.counts)
    assert base["kept"] <= base["nodes"] and base["logit"] == 3
    assert base["kept"] == sum(base[t] for t in ("embedding", "latent", "mlp_error", "logit"))

    # Moving the sliders re-prunes the cached matrix: no new attribution, same matrix object.
    ex.node_slider.value = 0.3  # observers call update()
    small = dict(ex.counts)
    ex.edge_slider.value = 0.99
    ex.node_slider.value = 0.99
    big = ex.update(render=False)
    assert ex.n_attributions == 1 and len(calls) == 1
    assert ex.cache[prompts["opposites"]].adjacency_matrix is A
    assert small["kept"] < base["kept"] < big["kept"]
    assert ex.result.settings["node_threshold"] == 0.99

    # The re-pruned graph equals a fresh prune at the same thresholds.
    fresh = prune_graph(A, ex.cache[prompts["opposites"]].logit_weights, model.cfg.n_layers, 0.99, 0.99)
    fresh = SimpleNamespace(kept_indices=fresh[0], pruned_matrix=fresh[1])
    assert torch.equal(fresh.kept_indices, ex.result.kept_indices)
    assert torch.equal(fresh.pruned_matrix, ex.result.pruned_matrix)

    # The figure has one marker per kept node.
    markers = sum(len(tr.x) for tr in ex.figure.data if tr.mode == "markers")
    assert markers == big["kept"]

    # A second prompt is attributed once, then cached; coming back to the first costs nothing.
    ex.prompt_picker.value = prompts["refusal"]
    ex.prompt_picker.value = prompts["opposites"]
    ex.prompt_picker.value = prompts["refusal"]
    assert ex.n_attributions == 2 and calls.count(prompts["refusal"]) == 1

    # A typed prompt is wrapped in the chat template, added to the picker and attributed.
    ex.user_text.value, ex.response_text.value = "What is the opposite of large?", "The opposite of large is"
    ex.add_prompt()
    typed = format_prompt("What is the opposite of large?", "The opposite of large is")
    assert ex.prompt_picker.value == typed and ex.result.prompt == typed and ex.n_attributions == 3


def test_explorer_uses_precomputed_results(toy_world):
    from part3_attribution_graphs.explorer import attribution_explorer

    model, transcoders = toy_world
    prompt = format_prompt("What is the opposite of small?", "The opposite of small is")
    done = attribute(model, transcoders, prompt, batch_size=64)

    def refuse(*args, **kwargs):
        raise AssertionError("should not recompute a cached prompt")

    ex = attribution_explorer(
        model, transcoders, [prompt], results={prompt: done}, attribute_fn=refuse, display=False
    )
    assert ex.n_attributions == 0 and ex.counts["kept"] == len(done.kept_indices)


def test_readme_badge_opens_the_exercises_notebook():
    readme = (nbb.ROOT / "README.md").read_text(encoding="utf-8")
    colab = nbb._substitute("{{COLAB_URL}}", "exercises")
    assert f"]({colab})" in readme, f"README's Colab badge should link {colab}"
    assert "bash scripts/instructor_demo.sh" in readme


@pytest.mark.notebook
def test_exercises_notebook_as_a_learner_first_opens_it(in_kernel_env):
    """Run with every stub still in place: each exercise's test says to fill in the stub, and nothing else
    breaks before the first exercise."""
    nb = nbformat.read(nbb.NOTEBOOKS["exercises"], as_version=4)
    client = nbb.notebook_client(
        nb,
        timeout=300,
        kernel_name=nbb.ensure_kernel(),
        allow_errors=True,
        resources={"metadata": {"path": str(nbb.NOTEBOOKS["exercises"].parent)}},
    )
    client.execute()
    code = [c for c in nb.cells if c.cell_type == "code"]

    def error(cell) -> str | None:
        errs = [o for o in cell.outputs if o.output_type == "error"]
        return f"{errs[0].ename}: {errs[0].evalue}" if errs else None

    first_exercise = next(i for i, c in enumerate(code) if "raise NotImplementedError(" in c.source)
    for cell in code[: first_exercise + 1]:
        assert error(cell) is None, f"{cell.source[:80]!r} failed before any exercise: {error(cell)}"
    for name, test in EXERCISES:
        cell = next(
            c for c in code if c.source.replace("# NBVAL_CHECK_OUTPUT", "").strip() == f"tests.{test}({name})"
        )
        message = error(cell) or ""
        assert message.startswith("AutograderFailure") and "did you fill in the stub?" in message, (
            name,
            message,
        )
        assert f"Exercise {name}: replace this line with your code" in message, (name, message)
