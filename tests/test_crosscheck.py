"""Our adjacency matrix against circuit-tracer's, on the same toy model, prompt and nodes (offline).

See `part3_attribution_graphs/tools/crosscheck.py` for where the two definitions differ and how we align them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import need

from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.nodes import NodeType
from part3_attribution_graphs.worlds.gemma import START_POSN, format_prompt

need("circuit_tracer")
from part3_attribution_graphs.tools import bench  # noqa: E402
from part3_attribution_graphs.tools.crosscheck import (  # noqa: E402
    aligned_adjacency,
    ct_attribute,
    ct_node_keys,
    ct_replacement_model,
    our_node_key,
)

PROMPT = format_prompt("What is the opposite of small?", "The opposite of small is **large")
COUPLET = format_prompt(
    "Write me a short rhyming couplet.", "The sun descends, a golden hue,\nAs evening whispers, soft and"
)
EVERY_LATENT = 10**6
RTOL = 1e-5  # relative to the largest edge, float32

pytestmark = [pytest.mark.crosscheck, pytest.mark.filterwarnings("ignore:Full backward hook is firing")]


def both_graphs(toy_world, prompt: str, start_posn: int):
    model, transcoders = toy_world
    ours = attribute(model, transcoders, prompt, start_posn=start_posn, top_k=EVERY_LATENT, batch_size=64)
    ct_model = ct_replacement_model(model, transcoders, start_posn=start_posn)
    token_ids = [n.feature for n in ours.graph.nodes if n.node_type == NodeType.LOGIT]
    theirs = ct_attribute(ct_model, model.to_tokens(prompt), token_ids, batch_size=128)
    return ours, theirs, ct_model


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_circuit_tracer_model_is_our_model(toy_world):
    """Same logits (this needs the per-layer rotary fix in `ct_replacement_model`) and same latents."""
    model, transcoders = toy_world
    ct_model = ct_replacement_model(model, transcoders, start_posn=0)
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(ct_model(tokens), model(tokens), rtol=1e-5, atol=1e-4)
        _, acts = ct_model.get_activations(tokens)
        cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_in"))[1]
        for layer, tc in transcoders.items():
            torch.testing.assert_close(
                acts[layer], tc.encode(cache[f"blocks.{layer}.mlp.hook_in"])[0], rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("prompt", [PROMPT, COUPLET])
def test_same_graph_edge_for_edge_without_masking(prompt, toy_world):
    """start_posn=0 (circuit-tracer: zero_positions = slice(0, 0)) and every active latent: one graph."""
    ours, theirs, _ = both_graphs(toy_world, prompt, start_posn=0)
    assert sorted(map(our_node_key, ours.graph.nodes), key=str) == sorted(ct_node_keys(theirs), key=str)
    a, b, keys = aligned_adjacency(ours, theirs)
    assert len(keys) == len(ours.graph) == theirs.adjacency_matrix.shape[0]
    assert b.abs().max() > 1 and torch.count_nonzero(b) > 10_000  # a real graph, not zeros
    diff = max_rel_diff(a, b)
    print(f"{len(keys)} nodes, max |ours - circuit-tracer| / max |A| = {diff:.1e}")
    assert diff < RTOL
    torch.testing.assert_close(ours.logit_weights, theirs.logit_probabilities, rtol=1e-5, atol=1e-7)


def test_masked_prefix_is_the_only_difference(toy_world):
    """With the chat-template prefix masked, edges agree on the common nodes; the definitions differ only
    there."""
    ours, theirs, _ = both_graphs(toy_world, PROMPT, start_posn=START_POSN)
    a, b, keys = aligned_adjacency(ours, theirs)
    assert max_rel_diff(a, b) < RTOL
    ct_keys = ct_node_keys(theirs)
    ct_A = theirs.adjacency_matrix
    # circuit-tracer keeps error nodes at masked positions, as zero vectors: no edges out of them.
    masked_errors = [i for i, k in enumerate(ct_keys) if k[0] == "error" and k[2] < START_POSN]
    assert masked_errors and torch.count_nonzero(ct_A[:, masked_errors]) == 0
    # Its embeddings at masked positions still send edges; ours send none, by definition.
    ct_masked_embeds = [i for i, k in enumerate(ct_keys) if k[0] == "E" and k[1] < START_POSN]
    assert torch.count_nonzero(ct_A[:, ct_masked_embeds]) > 0
    our_masked_embeds = [
        i
        for i, n in enumerate(ours.graph.nodes)
        if n.node_type == NodeType.EMBEDDING and n.ctx_idx < START_POSN
    ]
    assert torch.count_nonzero(ours.adjacency_matrix[:, our_masked_embeds]) == 0
    # Every other node of either graph is in the other.
    ours_keys = {our_node_key(n) for n in ours.graph.nodes}
    assert {k for k in ct_keys if k not in ours_keys} == {ct_keys[i] for i in masked_errors}


def test_top_k_latents_are_a_subset_and_their_edges_agree_where_no_error_node_differs(toy_world):
    """With top_k=5 our latents are circuit-tracer's most active ones; edges between latents still agree."""
    model, transcoders = toy_world
    ours = attribute(model, transcoders, PROMPT, start_posn=START_POSN, top_k=5, batch_size=64)
    _, theirs, _ = both_graphs(toy_world, PROMPT, start_posn=START_POSN)
    ct_keys = set(ct_node_keys(theirs))
    assert all(our_node_key(n) in ct_keys for n in ours.graph.nodes if n.node_type != NodeType.EMBEDDING)
    a, b, keys = aligned_adjacency(ours, theirs)
    # Error nodes differ (ours also hold the latents outside the top 5), so compare edges out of the rest.
    not_error = torch.tensor([k[0] != "error" for k in keys])
    assert max_rel_diff(a[:, not_error], b[:, not_error]) < RTOL
    errors = ~not_error
    assert max_rel_diff(a[:, errors], b[:, errors]) > 1e-2  # and the error nodes do differ


@pytest.mark.filterwarnings("error:.*performance drop.*")  # a vmap fallback would make the GPU case crawl
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_gemma_shape_code_path_runs_tiny(dtype, capsys):
    """The GPU case's code path (Gemma 3-1B's head layout, 5:1 local/global, bf16 and float32) at CPU size."""
    res = bench.main(
        [
            "--case",
            "gemma1b-shape",
            "--tiny",
            "--dtype",
            dtype,
            "--repeats",
            "1",
            "--seed-max-batches",
            "3",
            "--ct-batch-sizes",
            "128",
        ]
    )
    out = capsys.readouterr().out
    assert "(a) seed's per-node loop" in out and "(b) ours" in out and "(c) circuit-tracer" in out
    assert res["n_tokens"] == 30 and res["n_latents"] > 100
    # In bfloat16 both engines sit ~10% (of the largest edge) from float32 on edges out of error nodes
    # (an error vector is a small difference of large bf16 numbers) and agree with each other as closely.
    assert res["ct_vs_ours_max_rel_diff"] < (RTOL if dtype == "float32" else 0.25)
    assert all(r["seconds"] > 0 for r in res["rows"])


def test_seed_loop_reimplementation_gives_our_matrix(toy_world):
    """The benchmark's re-implementation of the seed's per-node loop computes the same edges as ours."""
    from part3_attribution_graphs.attribution import prepare_backward_batches
    from part3_attribution_graphs.replacement import FreezeHooks, TranscoderReplacementHooks

    model, transcoders = toy_world
    ours = attribute(model, transcoders, PROMPT, start_posn=START_POSN, top_k=2)
    tokens = model.to_tokens(PROMPT)
    freeze = FreezeHooks(model)
    tc_hooks = TranscoderReplacementHooks(model, transcoders, freeze.cache_frozen_values(tokens))
    A = bench.seed_compute_adjacency_matrix(
        model, tokens, ours.graph, freeze, tc_hooks, prepare_backward_batches(ours.graph, 8), START_POSN
    )
    assert not tc_hooks.installed
    assert max_rel_diff(A, ours.adjacency_matrix) < RTOL


def test_gpu_script_dry_run_writes_the_readme_rows(tmp_path, capsys):
    """The one-command GPU benchmark, on its CPU stand-ins: every case runs and the README gets dated rows."""
    from part3_attribution_graphs.tools import gpu_bench

    readme = tmp_path / "README.md"
    readme.write_text(
        "| case | a | b | c | a/b | c/b |\n|---|---|---|---|---|---|\n| toy | 1 | 2 | 3 | | |\n"
        "| Gemma 3-1B shape on an H100, bf16 / fp32 | pending | pending | pending | | |\n\nAfter.\n"
    )
    results = gpu_bench.main(["--dry-run", "--readme", str(readme)])
    assert [r["dtype"] for r in results] == ["bfloat16", "float32", "float32"]
    lines = readme.read_text().splitlines()
    assert lines[2] == "| toy | 1 | 2 | 3 | | |" and lines[-1] == "After."
    rows = [line for line in lines if line.startswith(gpu_bench.ROW_PREFIXES)]
    assert len(rows) == 3 and "pending" not in readme.read_text()
    assert all("CPU dry run" in row and row.count("|") == 7 for row in rows)
    # Run again: the script replaces its own rows rather than adding more.
    gpu_bench.update_readme(readme, rows[:1])
    assert sum(line.startswith(gpu_bench.ROW_PREFIXES) for line in readme.read_text().splitlines()) == 1
