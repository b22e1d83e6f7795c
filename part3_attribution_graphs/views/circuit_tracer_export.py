"""Write a pruned graph in circuit-tracer's file layout, for `circuit-tracer start-server`.

circuit-tracer's local server (`circuit-tracer start-server --graph_file_dir DIR`) serves, from DIR:

    DIR/graph-metadata.json        {"graphs": [metadata of each graph]}, read by the graph picker
    DIR/{slug}.json                one graph: metadata, qParams, nodes, links (Neuronpedia's format)
    DIR/features/{feature}.json    optional: one latent's details, when the graph's scan is "./data/features"

Its own writer (`circuit_tracer.utils.create_graph_files`) needs a circuit-tracer `Graph` and downloads
a tokenizer, so it cannot take our results; we write the same JSON ourselves (the graph JSON is the
Neuronpedia export). With `transcoders` (and optionally example data) we also write the latents'
detail files in circuit-tracer's feature format (`frontend/feature_models.py`), and point the
graph's scan at them, so the viewer's feature panels work from local files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..guard import guarded
from ..result import AttributionResult
from .examples import activation_histogram, feature_examples, feature_row
from .neuronpedia import build_graph_json, cantor_pair, kept_nodes, node_kind

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer
    from transformers import PreTrainedTokenizerBase

__all__ = ["LOCAL_FEATURE_SCAN", "export_circuit_tracer", "feature_json"]

# A scan starting with "./" makes circuit-tracer's viewer fetch `{scan}/{feature}.json` from the server;
# its server maps "/data/..." onto the graph folder.
LOCAL_FEATURE_SCAN = "./data/features"


def feature_json(
    layer: int,
    feature: int,
    logit_table: dict | None,
    example_data: dict | None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    activation: float = 0.0,
    transcoder_id: str = "",
    n_examples: int = 10,
) -> dict:
    """One latent's details in circuit-tracer's feature format (`frontend/feature_models.Model`)."""
    top = [tok for tok, _ in logit_table["top"]] if logit_table else []
    bottom = [tok for tok, _ in logit_table["bottom"]] if logit_table else []
    examples, histogram, quantiles, freq = [], [], [], 0.0
    act_min, act_max = 0.0, max(float(activation), 1e-6)
    if example_data is not None and feature_row(example_data, feature) is not None:
        row = feature_row(example_data, feature)
        freq = float(example_data["feature_frequencies"][row])
        hist = activation_histogram(example_data, feature, bins=50)
        if hist is not None:
            counts, edges = hist
            histogram, act_min, act_max = counts.tolist(), float(edges[0]), float(edges[-1])
            acts = example_data["activations"][row].float()
            acts = acts[acts > 0].sort().values
            idx = [min(len(acts) - 1, int(q / 100 * len(acts))) for q in range(1, 101)]
            quantiles = [float(acts[i]) for i in idx]
        examples = [
            {
                "tokens": ex["tokens"],
                "tokens_acts_list": [float(a) for a in ex["acts"]],
                "train_token_ind": ex["peak"],
                "is_repeated_datapoint": False,
            }
            for ex in feature_examples(example_data, feature, tokenizer, n_examples)
        ]
    return {
        "transcoder_id": transcoder_id or f"layer_{layer}",
        "index": cantor_pair(layer, feature),
        "examples_quantiles": [{"quantile_name": "Top activations", "examples": examples}]
        if examples
        else [],
        "top_logits": top,
        "bottom_logits": bottom,
        "act_min": act_min,
        "act_max": act_max,
        "quantile_values": quantiles,
        "histogram": histogram,
        "activation_frequency": freq,
    }


def _merge_metadata(folder: Path, metadata: dict) -> None:
    """Add (or replace, by slug) this graph's entry in `graph-metadata.json`."""
    path = folder / "graph-metadata.json"
    index = json.loads(path.read_text()) if path.exists() else {"graphs": []}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != metadata["slug"]] + [metadata]
    path.write_text(json.dumps(index, indent=2, ensure_ascii=False))


@guarded(result="result", model="model", transcoders="transcoders", optional=("model", "transcoders"))
def export_circuit_tracer(
    result: AttributionResult,
    path: str | Path,
    slug: str = "attribution-graph",
    model: HookedSAETransformer | None = None,
    transcoders: dict | None = None,
    example_data_by_layer: dict[int, dict] | None = None,
    scan: str | None = None,
) -> Path:
    """Write `result`'s pruned graph into folder `path` in circuit-tracer's layout; return the graph file.

    Then view it with `circuit-tracer start-server --graph_file_dir <path>` (the viewer itself loads
    d3 and friends from the web). With `model` and `transcoders`, latent detail files are written too
    and the scan is set to `LOCAL_FEATURE_SCAN`, unless `scan` is given.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with_features = model is not None and transcoders is not None
    data = build_graph_json(
        result, model, transcoders, slug=slug, scan=scan or (LOCAL_FEATURE_SCAN if with_features else None)
    )

    if with_features:
        from .dashboard import latent_logit_tables

        acts: dict[tuple[int, int], float] = {}
        for node in kept_nodes(result):
            if node_kind(node) == "latent":
                key = (int(node.layer), int(node.feature))
                acts[key] = max(acts.get(key, 0.0), float(node.activation))
        tables = latent_logit_tables(model, transcoders, sorted(acts), k=10)
        feat_dir = folder / "features"
        feat_dir.mkdir(exist_ok=True)
        for (layer, f), act in acts.items():
            examples = (example_data_by_layer or {}).get(layer)
            detail = feature_json(layer, f, tables.get((layer, f)), examples, model.tokenizer, act)
            (feat_dir / f"{cantor_pair(layer, f)}.json").write_text(json.dumps(detail, ensure_ascii=False))

    graph_file = folder / f"{slug}.json"
    graph_file.write_text(json.dumps(data, ensure_ascii=False))
    _merge_metadata(folder, data["metadata"])
    return graph_file
