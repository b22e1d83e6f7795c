"""The dashboard, the Neuronpedia and circuit-tracer exports, feature example data and the pruning figures,
all on the offline toy world."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch
from conftest import need
from safetensors.torch import save_file

from part3_attribution_graphs import utils
from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.nodes import NodeType
from part3_attribution_graphs.pruning import n_to_cross, prune_edges, prune_nodes
from part3_attribution_graphs.toy import make_toy_world
from part3_attribution_graphs.views import dashboard as dashboard_mod
from part3_attribution_graphs.views import examples as examples_mod
from part3_attribution_graphs.views.dashboard import latent_logit_tables
from part3_attribution_graphs.views.examples import (
    feature_examples,
    load_example_data,
    load_example_data_parallel,
)
from part3_attribution_graphs.views.neuronpedia import (
    FEATURE_TYPES,
    cantor_pair,
    export_neuronpedia,
    load_schema,
    view_graph,
)
from part3_attribution_graphs.worlds import hub as hub_mod
from part3_attribution_graphs.worlds.gemma import HubUnreachableError, format_prompt

PROMPT = format_prompt("What is the opposite of small?", "The opposite of small is **large")


@pytest.fixture(scope="module")
def world():
    return make_toy_world()


@pytest.fixture(scope="module")
def result(world):
    model, tcs = world
    return attribute(model, tcs, PROMPT, batch_size=64)


@pytest.fixture(scope="module")
def example_data(world):
    model, tcs = world
    return utils.make_toy_example_data(model, tcs, n_sequences=128)


@pytest.fixture(scope="module")
def dashboard(world, result, example_data, tmp_path_factory):
    model, tcs = world
    out = tmp_path_factory.mktemp("dashboard")
    page = utils.create_attribution_dashboard(
        result,
        model,
        tcs,
        example_data_by_layer=example_data,
        output_dir=out,
        display=False,
        scores={"replacement": 0.61},
    )
    return page, out


def page_data(page: str) -> dict:
    """The JSON the page renders from (it is embedded in the HTML)."""
    m = re.search(r'<script type="application/json" id="dashboard-data">(.*?)</script>', page, re.S)
    assert m, "no embedded data"
    return json.loads(m.group(1))


def n_edges(result) -> int:
    """Edges the viewers show (the pruned graph less the edges of latents dropped by `view_graph`)."""
    return len(view_graph(result).edges)


def n_nodes(result) -> int:
    return len(view_graph(result).indices)


# ------------------------------------------------------------------------------------------- Neuronpedia


def test_export_validates_against_schema(world, result, tmp_path):
    jsonschema = need("jsonschema")
    schema = load_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    model, tcs = world
    data = export_neuronpedia(result, model, tcs, slug="toy-opposite", path=tmp_path / "graph.json")
    jsonschema.validate(data, schema)
    assert json.loads((tmp_path / "graph.json").read_text()) == data

    # A broken export is caught by the schema (so the check above means something).
    bad = json.loads(json.dumps(data))
    del bad["nodes"][0]["jsNodeId"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_export_matches_pruned_graph(world, result):
    model, tcs = world
    data = export_neuronpedia(result, model, tcs, path=None)
    assert len(data["nodes"]) == n_nodes(result)
    assert len(data["links"]) == n_edges(result)
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(set(ids)) == len(ids), "node ids must be unique"
    assert {link["source"] for link in data["links"]} | {link["target"] for link in data["links"]} <= set(ids)

    meta = data["metadata"]
    assert meta["prompt"] == PROMPT and meta["prompt_tokens"] == result.str_tokens
    assert meta["scan"] == "toy-gemma-3" and meta["schema_version"] == 1
    assert meta["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.85}

    # Every link carries the pruned matrix's weight for its (target, source) pair.
    pos = {result.graph.nodes[i].node_id: k for k, i in enumerate(result.kept_indices.tolist())}
    M = result.pruned_matrix
    for link in data["links"]:
        assert link["weight"] == pytest.approx(float(M[pos[link["target"]], pos[link["source"]]]), rel=1e-5)

    # Node fields follow the graph and Neuronpedia's conventions.
    shown = [result.graph.nodes[i] for i in view_graph(result).indices]
    assert [n["node_id"] for n in data["nodes"]] == [n.node_id for n in shown]  # one id function
    for entry, node in zip(data["nodes"], shown):
        assert entry["feature_type"] == FEATURE_TYPES[node.node_type.value]
        assert entry["ctx_idx"] == node.ctx_idx
        if node.node_type == NodeType.LATENT:
            assert entry["feature"] == cantor_pair(node.layer, node.feature)
            assert entry["activation"] == pytest.approx(node.activation, rel=1e-5)
            assert entry["layer"] == str(node.layer)
        if node.node_type == NodeType.LOGIT:
            assert float(entry["clerp"].split("(p=")[1].rstrip(")")) == pytest.approx(
                node.token_prob, abs=1e-3
            )
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    assert all(0 <= n["influence"] <= 1 + 1e-9 for n in data["nodes"])


def test_cantor_pairing_is_neuronpedias():
    # Neuronpedia decodes with w = floor((sqrt(8z + 1) - 1) / 2), index = z - w(w + 1) / 2, layer = w - index.
    for layer, f in [(0, 0), (3, 17), (25, 16383)]:
        z = cantor_pair(layer, f)
        w = int(((8 * z + 1) ** 0.5 - 1) // 2)
        index = z - w * (w + 1) // 2
        assert (w - index, index) == (layer, f)


# ------------------------------------------------------------------------------------------- dashboard


def test_dashboard_files_and_counts(dashboard, result):
    page, out = dashboard
    assert (out / "index.html").read_text(encoding="utf-8") == page
    assert (out / "neuronpedia.json").exists()
    data = page_data(page)
    assert len(data["nodes"]) == n_nodes(result) == data["meta"]["n_nodes"]
    assert len(data["edges"]) == n_edges(result) == data["meta"]["n_edges"]
    assert data["meta"]["scores"] == {"replacement": 0.61}
    assert data["meta"]["node_threshold"] == 0.8 and data["meta"]["edge_threshold"] == 0.85
    # Every edge joins an earlier node (in graph order) to a later one, the sliders' extra ones too.
    nodes = data["nodes"] + data["extra"]["nodes"]
    assert all(s < t for s, t, *_ in data["edges"])
    assert all(nodes[s]["idx"] < nodes[t]["idx"] for s, t, *_ in data["edges"] + data["extra"]["edges"])
    # What the tests and the browser look for is in the page.
    for marker in ('id="panel"', "logit-table", "data-node-id", "edge-canvas", "--latent-fill"):
        assert marker in page


def test_logit_tables_match_direct_topk(world, result, dashboard):
    model, tcs = world
    data = page_data(dashboard[0])
    shown = [result.graph.nodes[i] for i in view_graph(result).indices]
    latents = sorted({(int(n.layer), n.feature) for n in shown if n.node_type == NodeType.LATENT})
    assert latents
    tables = latent_logit_tables(model, tcs, latents, k=10)
    for layer, f in latents:
        effects = tcs[layer].W_dec[f].detach() @ model.W_U.detach()
        top_v, top_i = effects.topk(10)
        bot_v, bot_i = effects.topk(10, largest=False)
        t = tables[(layer, f)]
        assert [tok for tok, _ in t["top"]] == [model.tokenizer.decode([i]) for i in top_i.tolist()]
        assert [tok for tok, _ in t["bottom"]] == [model.tokenizer.decode([i]) for i in bot_i.tolist()]
        assert torch.allclose(torch.tensor([v for _, v in t["top"]]), top_v, atol=1e-5)
        assert torch.allclose(torch.tensor([v for _, v in t["bottom"]]), bot_v, atol=1e-5)
        assert sum(t["hist"][0]) == model.cfg.d_vocab
        # The page shows the same tables.
        panel = data["latents"][f"{layer}_{f}"]
        assert [row[0] for row in panel["top"]] == [tok for tok, _ in t["top"]]
        assert panel["top"][0][1] == pytest.approx(float(top_v[0]), rel=1e-3)
        assert panel["ex"]["examples"], "toy example data should give every kept latent some examples"


def test_page_needs_no_network(dashboard):
    page = dashboard[0]
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"<link[^>]*\bhref\s*=", page, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", page, re.I)
    assert "http://" not in page and "https://" not in page


def test_dashboard_without_transcoders_or_examples(world, result, tmp_path):
    model, _ = world
    page = utils.create_attribution_dashboard(result, model, output_dir=tmp_path, display=False)
    data = page_data(page)
    assert "logits" in data["meta"]["notes"] and "examples" in data["meta"]["notes"]
    assert all("top" not in panel for panel in data["latents"].values())
    assert len(data["nodes"]) == n_nodes(result)


def test_dashboard_renders_a_saved_and_reloaded_result(world, result, tmp_path):
    """The dashboard needs nothing that `save` drops: a reloaded result draws the same page data."""
    from part3_attribution_graphs.result import AttributionResult

    loaded = AttributionResult.load(result.save(tmp_path / "graph.pt"))
    model, tcs = world
    data = page_data(
        utils.create_attribution_dashboard(loaded, model, tcs, output_dir=tmp_path, display=False)
    )
    full = page_data(
        utils.create_attribution_dashboard(result, model, tcs, output_dir=tmp_path, display=False)
    )
    assert data["nodes"] == full["nodes"]
    assert data["edges"] == full["edges"]


def test_dashboard_escapes_script_breaking_text(world, result, tmp_path):
    model, _ = world
    data = dashboard_mod.dashboard_data(result, model)
    data["meta"]["prompt"] = "</script><script>alert(1)</script> & more"
    page = dashboard_mod.render_dashboard_html(data)
    assert page.count("</script>") == 2  # only the page's own two script elements end
    assert page_data(page)["meta"]["prompt"] == data["meta"]["prompt"]


def test_display_uses_srcdoc_iframe(monkeypatch, world, result, tmp_path):
    import IPython
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    model, tcs = world
    utils.create_attribution_dashboard(result, model, tcs, output_dir=tmp_path, display=True)
    assert len(shown) == 1
    frame = shown[0]._repr_html_()
    assert "<iframe srcdoc=" in frame and 'sandbox="allow-scripts' in frame
    # The page is escaped inside the attribute; the one script outside it hides the "untrusted" line.
    outside = re.sub(r'srcdoc="[^"]*"', "", frame)
    assert outside.count("<script") == 1 and "document.currentScript" in outside
    assert "trust the notebook" in outside and "re-run this cell" in outside
    # Viewers that drop the HTML (an untrusted notebook, a terminal) still say what and where it is.
    index = str((tmp_path / "index.html").resolve())
    assert repr(shown[0]) == f"Attribution dashboard: {index} (open it in a browser)"
    assert index in frame.split("<iframe")[0]


def test_inline_caption_names_the_page_relative_to_the_working_folder(monkeypatch, world, result, tmp_path):
    import IPython
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    monkeypatch.chdir(tmp_path)
    utils.create_attribution_dashboard(result, None, output_dir="outputs/couplet", display=True)
    assert repr(shown[0]) == "Attribution dashboard: outputs/couplet/index.html (open it in a browser)"
    assert "<code>outputs/couplet/index.html</code>" in shown[0]._repr_html_()
    assert str(tmp_path) not in shown[0]._repr_html_().split("<iframe")[0]


def test_view_drops_latents_without_edges_like_circuit_tracer(result):
    view = view_graph(result)
    graph, kept = result.graph, result.kept_indices.tolist()
    # Independently: apply the rule to the pruned matrix, one node at a time, until it holds.
    M = (result.pruned_matrix != 0).tolist()
    alive = set(range(len(kept)))
    while True:
        drop = set()
        for k in alive:
            kind = graph.nodes[kept[k]].node_type
            ins = any(M[k][j] for j in alive)
            outs = any(M[j][k] for j in alive)
            if (kind == NodeType.LATENT and not (ins and outs)) or (kind == NodeType.MLP_ERROR and not outs):
                drop.add(k)
        if not drop:
            break
        alive -= drop
    want = {kept[k] for k in alive} | {
        i for i, n in enumerate(graph.nodes) if n.node_type == NodeType.EMBEDDING
    }
    assert view.indices == sorted(want)
    assert set(view.dropped) == set(kept) - {kept[k] for k in alive}
    assert view.dropped, "the toy graph has latents without an incoming edge: the rule should drop some"
    # Every token has its embedding node; every shown latent has an incoming and an outgoing edge.
    assert sum(graph.nodes[i].node_type == NodeType.EMBEDDING for i in view.indices) == len(result.str_tokens)
    has_in = {t for _, t, _ in view.edges}
    has_out = {s for s, _, _ in view.edges}
    for k, i in enumerate(view.indices):
        if graph.nodes[i].node_type == NodeType.LATENT:
            assert k in has_in and k in has_out


def test_one_node_id_for_every_export_and_examples_by_default(tmp_path):
    from part3_attribution_graphs.__main__ import main

    out = tmp_path / "graph"
    main(["--out", str(out), "--batch-size", "64"])
    nodes_json = {n["node_id"] for n in json.loads((out / "nodes.json").read_text())["nodes"]}
    page = page_data((out / "index.html").read_text(encoding="utf-8"))
    export = json.loads((out / "neuronpedia.json").read_text())
    assert {n["id"] for n in page["nodes"]} == {n["node_id"] for n in export["nodes"]}
    assert {n["id"] for n in page["nodes"]} <= nodes_json
    assert any(n["id"].startswith("L_") for n in page["nodes"] if n["type"] == "logit")
    # `make graph` includes example data: every latent panel has top activations.
    panels = list(page["latents"].values())
    assert panels and all(p["ex"]["examples"] for p in panels)
    assert "examples" not in page["meta"]["notes"]


def test_no_examples_flag(tmp_path):
    from part3_attribution_graphs.__main__ import main

    main(["--out", str(tmp_path), "--batch-size", "64", "--no-examples"])
    page = page_data((tmp_path / "index.html").read_text(encoding="utf-8"))
    assert "examples" in page["meta"]["notes"]
    assert all("ex" not in p for p in page["latents"].values())


def test_interventions_in_the_node_panel(world, result, tmp_path):
    model, tcs = world
    shown = view_graph(result).indices
    a, b = shown[-1], shown[len(shown) // 2]
    page = utils.create_attribution_dashboard(
        result,
        model,
        tcs,
        output_dir=tmp_path,
        display=False,
        interventions={a: (-0.25, -0.2), b: (0.125, 0.5)},
    )
    nodes = page_data(page)["nodes"]
    by_id = {n["id"]: n for n in nodes}
    assert by_id[result.graph.nodes[a].node_id]["ablate"] == [-0.25, -0.2]
    assert by_id[result.graph.nodes[b].node_id]["ablate"] == [0.125, 0.5]
    assert sum("ablate" in n for n in nodes) == 2
    assert "ablate: predicted \\u0394" in page  # the panel's wording (the script writes Δ as \u0394)
    missing = next(i for i in range(len(result.graph.nodes)) if i not in set(shown))
    with pytest.raises(ValueError, match="does not show"):
        utils.create_attribution_dashboard(
            result, model, tcs, output_dir=tmp_path, display=False, interventions={missing: (0.0, 0.0)}
        )


def test_labels_derived_and_saved_state_restored(world, result, example_data, tmp_path):
    model, tcs = world
    page = utils.create_attribution_dashboard(
        result, model, tcs, example_data_by_layer=example_data, output_dir=tmp_path, display=False
    )
    data = page_data(page)
    # Every latent has a derived label, from its examples (views/labels.py: an enriched word, where it peaks).
    assert all(p["derived"] and not p["derived"].startswith("fires on ") for p in data["latents"].values())
    assert data["state"] == {}
    # A state saved by the page (the same keys) beside the page is carried into the next page and export.
    saved = json.loads((tmp_path / "neuronpedia.json").read_text())
    latents = [n["node_id"] for n in saved["nodes"] if n["feature_type"] == "cross layer transcoder"]
    saved["qParams"].update(
        pinnedIds=latents[:3] + ["gone_1_2"],
        supernodes=[["pair", *latents[:2]]],
        clickedId=latents[0],
        labels={latents[0]: "my label", "gone_1_2": "x"},
    )
    (tmp_path / "neuronpedia.json").write_text(json.dumps(saved))
    data = page_data(
        utils.create_attribution_dashboard(result, model, tcs, output_dir=tmp_path, display=False)
    )
    q = data["state"]["qParams"]
    assert q["pinnedIds"] == latents[:3] + ["gone_1_2"]  # the page drops unknown ids itself
    assert data["state"]["labels"] == {latents[0]: "my label", "gone_1_2": "x"}
    export = json.loads((tmp_path / "neuronpedia.json").read_text())
    assert export["qParams"]["pinnedIds"] == latents[:3]
    assert export["qParams"]["supernodes"] == [["pair", *latents[:2]]]
    assert export["qParams"]["labels"] == {latents[0]: "my label"}
    assert {n["node_id"]: n["clerp"] for n in export["nodes"]}[latents[0]] == "my label"


def test_page_is_built_from_the_assets(dashboard):
    from part3_attribution_graphs.views.dashboard import ASSETS
    from part3_attribution_graphs.views.palette import NODE_FILL

    page = dashboard[0]
    for name in ("dashboard.css", "dashboard.js"):
        assert (ASSETS / name).read_text(encoding="utf-8").strip()[:200] in page
    assert all(colour in page for colour in NODE_FILL.values())


def test_explorer_uses_the_palette_and_graph_names(result):
    from part3_attribution_graphs.explorer import graph_figure
    from part3_attribution_graphs.views.palette import NODE_FILL, NODE_NAMES

    fig = graph_figure(result)
    markers = {t.name: t.marker.color for t in fig.data if t.mode == "markers"}
    assert markers == {NODE_NAMES[k]: NODE_FILL[k] for k in NODE_FILL if NODE_NAMES[k] in markers}
    assert "mlp_error" not in markers and "MLP error" in markers
    ticks = fig.layout.xaxis.ticktext
    assert not any("\\n" in t for t in ticks) and any("⏎" in t for t in ticks)


# ------------------------------------------------------------------------------------------- example data


def write_hub_layout(root: Path, data_by_layer: dict, **kw) -> None:
    for layer, data in data_by_layer.items():
        path = root / examples_mod.example_file_path(layer, **kw)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in data.items()}, str(path))


def test_example_loader_offline(monkeypatch, tmp_path, example_data):
    """Whole example files from the (loopback) hub, reached through HF_ENDPOINT: the right repository and
    folder for each variant."""
    from part3_attribution_graphs.worlds.offline_hub import offline_hub

    hub = tmp_path / "hub"
    write_hub_layout(hub / "google/gemma-scope-2-1b-it", {2: example_data[2], 3: example_data[3]})
    (hub / "google/gemma-scope-2-270m-pt").mkdir(parents=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with offline_hub(hub) as served:
        loaded = load_example_data(2)
        asked = [path for path, _ in served.requests if "/resolve/" in path]
        assert asked and all(
            "/google/gemma-scope-2-1b-it/resolve/" in path
            and path.endswith("transcoder_all/layer_2_width_16k_l0_small_affine/examples.safetensors")
            for path in asked
        ), asked
        assert set(loaded) == set(example_data[2])
        for key, value in example_data[2].items():
            assert torch.equal(loaded[key], value), key

        both = load_example_data_parallel([2, 3], max_workers=2)
        assert sorted(both) == [2, 3] and torch.equal(both[3]["activations"], example_data[3]["activations"])

        # Other variants name other repositories and folders.
        served.requests.clear()
        with pytest.raises(HubUnreachableError, match="not found"):
            load_example_data(
                5, model_size="270m", instruction_tuned=False, l0="big", affine=False, width="262k"
            )
        asked = [path for path, _ in served.requests if "/resolve/" in path]
    assert asked and all(
        "/google/gemma-scope-2-270m-pt/resolve/" in path
        and path.endswith("transcoder_all/layer_5_width_262k_l0_big/examples.safetensors")
        for path in asked
    ), asked


def test_example_subset_load_matches_full(monkeypatch, tmp_path, world, example_data):
    model, _ = world
    hub = tmp_path / "hub"
    write_hub_layout(hub, {1: example_data[1]})  # local_dir holds the file: nothing is downloaded
    fired = (example_data[1]["activations"][:, 0] > 0).nonzero().flatten()[:5].tolist()
    short = load_example_data(1, features=fired, n_examples=20, local_dir=hub)
    assert short["activations"].shape == (len(fired), 20)
    subset = load_example_data(1, features=fired, local_dir=hub)
    assert subset["feature_ids"].tolist() == fired
    assert subset["tokens"].shape[0] <= example_data[1]["tokens"].shape[0]
    for f in fired:
        full = feature_examples(example_data[1], f, model.tokenizer, n_examples=3)
        part = feature_examples(subset, f, model.tokenizer, n_examples=3)
        assert [e["tokens"] for e in part] == [e["tokens"] for e in full]
        assert [e["acts"] for e in part] == [e["acts"] for e in full]
    assert feature_examples(subset, max(fired) + 1000, model.tokenizer) == []


def test_example_loader_reads_local_dir_without_download(monkeypatch, tmp_path, example_data):
    from part3_attribution_graphs.worlds.offline_hub import offline_hub

    write_hub_layout(tmp_path / "local", {0: example_data[0]})
    with offline_hub(tmp_path / "hub") as served:
        loaded = load_example_data(0, local_dir=tmp_path / "local")
    assert served.requests == []
    assert torch.equal(loaded["tokens"], example_data[0]["tokens"])


def test_example_loader_without_network_says_so(monkeypatch):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{sock.getsockname()[1]}")  # nothing listens there
    sock.close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_mod, "REQUEST_DEADLINE_S", 3.0)
    with pytest.raises(HubUnreachableError, match="network") as info:
        load_example_data(0)
    assert "make_toy_example_data" in str(info.value) and "google/gemma-scope-2-1b-it" in str(info.value)


def test_toy_example_data_layout(world, example_data):
    model, tcs = world
    for layer, data in example_data.items():
        assert set(data) == set(examples_mod.EXAMPLE_KEYS)
        F = tcs[layer].cfg.d_sae
        assert data["activations"].shape[0] == F and data["top_tokens"].shape == (F, 10)
        # Activations are sorted per latent, and each one is what the transcoder gives on that token.
        acts = data["activations"]
        assert torch.all(acts[:, :-1] >= acts[:, 1:])
        f = int(acts[:, 0].argmax())
        s, p = int(data["seq_ids"][f, 0]), int(data["positions"][f, 0])
        _, cache = model.run_with_cache(
            data["tokens"][s : s + 1].long(), names_filter=f"blocks.{layer}.mlp.hook_in"
        )
        direct = tcs[layer].encode(cache[f"blocks.{layer}.mlp.hook_in"])[0, p, f].detach()
        assert float(direct) == pytest.approx(float(acts[f, 0]), rel=1e-4)


def test_inspect_feature(world, example_data):
    model, _ = world
    f = int(example_data[2]["activations"][:, 0].argmax())
    table = utils.inspect_feature(example_data[2], f, model.tokenizer, n_examples=4, layer=2)
    assert len(table.data) == 4
    page = table._repr_html_()
    # Inline styles only (an untrusted notebook strips <style> blocks), and the layer is named.
    assert "<style" not in page and 'style="' in page
    assert "background-color: rgba(34, 160, 70" in page
    assert "max act" in page and f"Latent {f} @ layer 2" in page
    assert repr(table).startswith(f"Latent {f} @ layer 2")
    assert not any("\n" in str(v) for v in table.data.to_numpy().ravel())


# ------------------------------------------------------------------------------------------- circuit-tracer


@pytest.mark.crosscheck
def test_circuit_tracer_export_loads_back(world, result, example_data, tmp_path):
    need("circuit_tracer")
    from circuit_tracer.frontend import feature_models, graph_models
    from circuit_tracer.frontend.local_server import serve

    model, tcs = world
    graph_file = utils.export_circuit_tracer(
        result,
        tmp_path,
        slug="toy-opposite",
        model=model,
        transcoders=tcs,
        example_data_by_layer=example_data,
    )
    graph = graph_models.Model.model_validate_json(graph_file.read_text())
    assert len(graph.nodes) == n_nodes(result) and len(graph.links) == n_edges(result)
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["toy-opposite"]
    graph_models.Metadata.model_validate(index["graphs"][0])
    n_latents = len({(n.layer, n.feature) for n in result.kept_nodes if n.node_type == NodeType.LATENT})
    feature_files = sorted((tmp_path / "features").glob("*.json"))
    assert len(feature_files) == n_latents
    for path in feature_files:
        feature_models.Model.model_validate_json(path.read_text())

    # Writing a second graph keeps the first in the index.
    utils.export_circuit_tracer(result, tmp_path, slug="second")
    assert [g["slug"] for g in json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]] == [
        "toy-opposite",
        "second",
    ]

    # circuit-tracer's own server hands the files to its viewer.
    server = serve(data_dir=str(tmp_path), port=0)
    try:
        port = server.httpd.server_address[1]
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/data/graph-metadata.json", timeout=10) as resp:
            assert len(json.loads(resp.read())["graphs"]) == 2
        with urllib.request.urlopen(f"{base}/graph_data/toy-opposite.json", timeout=10) as resp:
            assert graph_models.Model.model_validate_json(resp.read()).metadata.slug == "toy-opposite"
        scan = graph.metadata.scan  # the viewer fetches f"{scan}/{feature}.json" for a "./" scan
        latent = next(n for n in graph.nodes if n.feature_type == "cross layer transcoder")
        with urllib.request.urlopen(f"{base}/{scan[2:]}/{latent.feature}.json", timeout=10) as resp:
            assert feature_models.Model.model_validate_json(resp.read()).index == latent.feature
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------- figures


def test_demo_pruning_with_reference_functions():
    figs = utils.demo_pruning(prune_nodes, prune_edges)
    assert len(figs) == 3 and all(isinstance(f, go.Figure) for f in figs)
    n_kept = [sum(len(t.x) for t in f.data if t.name == "kept") for f in figs]
    assert n_kept[0] == 30 and n_kept[0] >= n_kept[1] >= n_kept[2] >= 3


def test_demo_pruning_accepts_lists_and_masks_and_explains_bad_output():
    def nodes_as_mask(A, w, n_layers, threshold):
        kept, pruned = prune_nodes(A, w, n_layers, threshold)
        mask = torch.zeros(A.shape[0], dtype=torch.bool)
        mask[kept] = True
        return mask, pruned.numpy()

    def edges_as_lists(A, w, n_layers, threshold):
        kept, pruned = prune_edges(A, w, n_layers, threshold)
        return kept.tolist(), pruned.tolist()

    figs = utils.demo_pruning(nodes_as_mask, edges_as_lists)
    ref = utils.demo_pruning(prune_nodes, prune_edges)
    assert [f.layout.title.text for f in figs] == [f.layout.title.text for f in ref]

    with pytest.raises(ValueError, match="should be"):
        utils.demo_pruning(lambda A, w, n, t: (torch.arange(3), A), prune_edges)
    with pytest.raises(ValueError, match="return"):
        utils.demo_pruning(lambda A, w, n, t: None, prune_edges)
    with pytest.raises(ValueError, match="in \\[0, 30\\)"):
        utils.demo_pruning(lambda A, w, n, t: (torch.tensor([0, 99]), A[:2, :2]), prune_edges)


def test_plot_cumulative_influence(result):
    fig = utils.plot_cumulative_influence(result.influence, threshold=0.8)
    y = torch.tensor(fig.data[0].y)
    assert y[-1] == pytest.approx(1.0) and torch.all(y[1:] >= y[:-1] - 1e-12)
    needed = n_to_cross(result.influence.sort(descending=True).values, 0.8)
    assert any(getattr(s, "x0", None) == needed for s in fig.layout.shapes)


def test_utils_reexports():
    for name in (
        "create_attribution_dashboard",
        "export_neuronpedia",
        "export_circuit_tracer",
        "load_example_data",
        "load_example_data_parallel",
        "make_toy_example_data",
        "inspect_feature",
        "demo_pruning",
        "plot_cumulative_influence",
        "load_saes_parallel",
    ):
        assert callable(getattr(utils, name)), name


def test_toy_example_data_logit_tables_for_chosen_latents(world, result, example_data):
    model, tcs = world
    wanted = utils.features_in_graph(result)
    part = utils.make_toy_example_data(model, tcs, n_sequences=128, features_by_layer=wanted)
    for layer, data in part.items():
        chosen = wanted.get(layer, [])
        assert torch.equal(data["top_tokens"][chosen], example_data[layer]["top_tokens"][chosen])
        assert torch.equal(data["activations"], example_data[layer]["activations"])
        others = [f for f in range(data["top_logits"].shape[0]) if f not in set(chosen)]
        assert torch.all(data["top_logits"][others] == 0)


def test_explorer_adds_a_prompt_without_flicker(world, result):
    from part3_attribution_graphs.explorer import AttributionExplorer

    model, tcs = world
    other = format_prompt("What is the opposite of hot?", "The opposite of hot is")

    class Recording(AttributionExplorer):
        shown: list

        def update(self, change=None, render=True):
            self.shown.append(self.prompt_picker.value)
            return super().update(change, render)

    second = format_prompt("What is the opposite of big?", "The opposite of big is")
    ex = Recording(
        model,
        tcs,
        {"first": PROMPT, "second": second},
        results={PROMPT: result, second: result, other: result},
        attribute_fn=lambda *a, **k: pytest.fail("cached prompts are not recomputed"),
    )
    ex.shown = []
    ex.prompt_picker.value = second
    assert ex.shown == [second]
    ex.shown = []
    ex.user_text.value, ex.response_text.value = "What is the opposite of hot?", "The opposite of hot is"
    ex.add_prompt()
    # One update, for the new prompt: the graph never flicks back to the first prompt on the way.
    assert ex.shown == [other] and ex.prompt_picker.value == other


def test_similar_latents_by_shared_rare_contexts_and_by_decoder_without_examples():
    """Latents that fire on the same rare contexts are offered; contexts that many latents record count
    little, so two latents that share only those are not (an unweighted overlap would join them); latents
    of a layer without example data are compared by their decoders, and one that recorded no example
    (it never fired on the corpus) is in no pair, whatever its decoder."""
    from types import SimpleNamespace

    from part3_attribution_graphs.views.suggestions import similar_latents

    common = [(s, 1) for s in range(6)]  # recorded by latents 0-3 and by six others (4-9): weight 1/10 each
    own = {0: common + [(0, 2), (1, 2), (4, 4)], 1: common + [(0, 2), (1, 2)]}  # (0, 2), (1, 2): weight 1/2
    own |= {2: common + [(2, 3), (3, 3)], 3: common + [(2, 3), (3, 3)]}
    own |= {k: common for k in range(4, 10)}
    acts, seq, pos = torch.zeros(11, 9), torch.full((11, 9), -1), torch.full((11, 9), -1)  # 10: none
    for k, where in own.items():
        acts[k, : len(where)] = torch.linspace(2, 1, len(where))
        seq[k, : len(where)] = torch.tensor([s for s, _ in where])
        pos[k, : len(where)] = torch.tensor([p for _, p in where])
    corpus = torch.arange(30, dtype=torch.int).reshape(6, 5)  # six distinct sequences
    examples = {1: {"activations": acts, "seq_ids": seq, "positions": pos, "tokens": corpus}}
    W0 = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]])
    tcs = {0: SimpleNamespace(W_dec=W0), 1: SimpleNamespace(W_dec=torch.tensor([[0.0, 0.0, 1.0]] * 11))}
    pairs = similar_latents([(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3), (1, 10)], tcs, examples)
    assert [(a, b, why) for a, b, _, why in pairs] == [
        ((0, 0), (0, 1), "decoder"),  # layer 0 has no examples
        ((1, 0), (1, 1), "contexts"),
        ((1, 2), (1, 3), "contexts"),
    ]  # (1, 0) and (1, 2): unweighted Jaccard 6/10, weighted 0.6/3.6; their decoders agree, unused
    assert pairs[0][2] == pytest.approx(0.9 / (0.81 + 0.01) ** 0.5)
    assert pairs[1][2] == pytest.approx((0.6 + 1) / (0.6 + 1 + 1)) and pairs[2][2] == pytest.approx(1.0)
    assert similar_latents([(0, 0), (1, 0)], None, None) == []


def test_similar_latents_match_contexts_across_layers_that_hold_different_subsets_of_the_corpus():
    """A subset load of hub example data keeps, per layer, only the sequences its latents need, with seq_ids
    into that subset: a context is the same text at the same position, whatever row it has in each layer."""
    from part3_attribution_graphs.views.suggestions import similar_latents

    corpus = torch.arange(40).reshape(8, 5)

    def layer(rows, where):
        """A layer's data holding corpus rows `rows`: one latent, firing at each (corpus row, position)."""
        seq = torch.tensor([[rows.index(s) for s, _ in where]])
        pos = torch.tensor([[p for _, p in where]])
        return {
            "activations": torch.ones(1, len(where)),
            "seq_ids": seq,
            "positions": pos,
            "tokens": corpus[rows],
        }

    fires = [(1, 2), (3, 4), (6, 1)]  # (corpus row, position)
    examples = {1: layer([1, 3, 6], fires), 2: layer([6, 0, 3, 1], fires)}
    assert [(a, b, why) for a, b, _, why in similar_latents([(1, 0), (2, 0)], None, examples)] == [
        ((1, 0), (2, 0), "contexts")
    ]
    examples[2] = layer([6, 0, 3, 1], [(1, 3), (3, 2), (6, 2)])  # the same rows, other positions
    assert similar_latents([(1, 0), (2, 0)], None, examples) == []
