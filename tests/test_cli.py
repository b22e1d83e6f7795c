"""`python -m part3_attribution_graphs`: fast answers to --help and bad arguments, --out checked first,
one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from part3_attribution_graphs import __main__ as cli

# Runs the CLI as `python -m` does and reports whether torch was imported by the time it exited.
_RUN_AND_REPORT_TORCH = """
import runpy, sys
sys.argv = ["part3_attribution_graphs", *sys.argv[1:]]
try:
    runpy.run_module("part3_attribution_graphs", run_name="__main__", alter_sys=True)
except SystemExit as done:
    code = done.code
print(f"exit={code} torch={'torch' in sys.modules}")
"""


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _RUN_AND_REPORT_TORCH, *args], capture_output=True, text=True, timeout=300
    )


def test_help_answers_without_importing_torch():
    proc = _run_cli("--help")
    assert "--node-threshold" in proc.stdout
    assert proc.stdout.strip().endswith("exit=0 torch=False"), proc.stdout[-300:] + proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--top-k", "2.5"], "argument --top-k: expected a whole number, got '2.5'"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--node-threshold", "80"], "argument --node-threshold: must be a fraction in (0, 1]"),
        (["--world", "gemma3"], "argument --world: invalid choice: 'gemma3'"),
    ],
)
def test_a_bad_argument_is_a_usage_error_before_any_heavy_import(args, complaint):
    proc = _run_cli(*args)
    assert complaint in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip().endswith("exit=2 torch=False"), proc.stdout[-300:] + proc.stderr[-2000:]


def _fail_if_loaded(name):
    raise AssertionError(f"the {name} world was loaded before --out was checked")


@pytest.mark.parametrize("kind", ["a file", "below a file"])
def test_out_is_checked_before_the_world_loads(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.setattr(cli, "load_world", _fail_if_loaded)
    blocker = tmp_path / "graph.txt"
    blocker.write_text("not a folder")
    out = blocker if kind == "a file" else blocker / "graph"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--out", str(out)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--out {out}" in err
    assert ("is a file, not a folder" if kind == "a file" else "cannot write to") in err


def test_an_error_inside_the_run_is_one_line_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--out", str(tmp_path), "--n-output-nodes", "100000", "--no-dashboard"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Backward batches")]
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m part3_attribution_graphs: error: n_output_nodes must be in [1, ")
    assert "--traceback" in lines[0]


def test_traceback_flag_lets_the_exception_through(tmp_path):
    with pytest.raises(ValueError, match="n_output_nodes"):
        cli.main(["--out", str(tmp_path), "--n-output-nodes", "100000", "--no-dashboard", "--traceback"])


def test_a_good_run_writes_its_files_and_prints_the_summary(tmp_path, capsys):
    summary = cli.main(["--out", str(tmp_path / "new" / "graph"), "--no-dashboard", "--batch-size", "64"])
    assert summary["files"] == ["graph.pt", "nodes.json"]
    printed = json.loads(capsys.readouterr().out)
    assert printed["nodes"] == summary["nodes"] > 0


def test_planted_world_dashboard_with_interventions_on_pruned_away_latents(tmp_path):
    """On the planted world the most influential latents can be pruned away; the dashboard gets the measured
    ones it shows and nodes.json keeps all (this run used to stop: "the dashboard does not show" node 425)."""
    user = "Ambry. What is the fruit of its land?"
    args = ["--world", "planted", "--user", user, "--response", "Answer:", "--interventions", "5"]
    summary = cli.main([*args, "--out", str(tmp_path / "graph"), "--no-examples"])
    assert "index.html" in summary["files"] and set(summary["interventions"]) == {"frozen", "live"}
    nodes = json.loads((tmp_path / "graph" / "nodes.json").read_text())["nodes"]
    assert sum("ablation" in n for n in nodes) == 5


def test_the_default_run_is_the_planted_worlds_held_out_two_hop_question():
    """`make graph` shows a graph with something to find: the planted world, on a question it was never
    trained on, whose answer the ground truth knows."""
    from part3_attribution_graphs.worlds.gemma import format_prompt
    from part3_attribution_graphs.worlds.planted import planted_facts

    args = cli.settle_arguments(cli.build_parser(), cli.build_parser().parse_args([]))
    assert args.world == "planted"
    prompt = format_prompt(args.user, args.response)
    assert prompt in {f.prompt for f in planted_facts("two_hop", split="heldout")}
    toy = cli.settle_arguments(cli.build_parser(), cli.build_parser().parse_args(["--world", "toy"]))
    assert (toy.user, toy.response) == (cli.DEFAULT_USER, cli.DEFAULT_RESPONSE)
