"""Export a pruned attribution graph as JSON in Neuronpedia's graph format.

The format is the one Neuronpedia's graph viewer and circuit-tracer's local frontend both read
(described by `apps/webapp/app/api/graph/graph-schema.json` in the Neuronpedia repository; our own
JSON Schema for it is `neuronpedia_schema.json` beside this file). Top level: `metadata`,
`qParams`, `nodes`, `links`.

Node conventions follow circuit-tracer's `frontend/graph_models.py`, so both viewers decode them:

| our node       | node_id                   | feature                 | layer            | feature_type               |
|----------------|---------------------------|-------------------------|------------------|----------------------------|
| embedding      | `E_{token id}_{pos}`      | pos                     | `"E"`            | `"embedding"`              |
| latent (l, f)  | `{l}_{f}_{pos}`           | cantor(l, f)            | `"l"`            | `"cross layer transcoder"` |
| MLP error (l)  | `{l}_err_{pos}`           | -1                      | `"l"`            | `"mlp reconstruction error"` |
| logit (v)      | `{n_layers+1}_{v}_{pos}`  | v                       | `"{n_layers+1}"` | `"logit"`                  |

`metadata.schema_version = 1` tells Neuronpedia that latent `feature`s are Cantor pairs of
(layer, index). circuit-tracer names error nodes `0_{l}_{pos}`, which collides with latent ids of
layer 0; ours keep an `err` tag instead so every id is unique.

A node's `influence` is the viewers' pruning score: the cumulative share of total influence reached
when nodes are sorted by influence and this node is included (small = important), as in
circuit-tracer. The raw influence is kept in `influence_raw`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..nodes import NodeInfo
from ..result import AttributionResult

__all__ = [
    "node_kind",
    "kept_nodes",
    "result_influence",
    "result_settings",
    "result_tokens",
    "FEATURE_TYPES",
    "SCHEMA_PATH",
    "cantor_pair",
    "export_node_id",
    "export_node_ids",
    "cumulative_influence",
    "pruned_edges",
    "default_scan",
    "build_graph_json",
    "export_neuronpedia",
    "load_schema",
]

# Neuronpedia's `feature_type` strings for our four kinds of node (keyed by `NodeType` value).
FEATURE_TYPES = {
    "embedding": "embedding",
    "latent": "cross layer transcoder",
    "mlp_error": "mlp reconstruction error",
    "logit": "logit",
}


# Accessors that also accept a learner's own result/node classes, as long as the fields match.
def node_kind(node: NodeInfo) -> str:
    """The node's type as its `NodeType` value: "embedding", "latent", "mlp_error" or "logit"."""
    t = node.node_type
    return str(getattr(t, "value", t))


def kept_nodes(result: AttributionResult) -> list[NodeInfo]:
    """The pruned graph's nodes, in `kept_indices` order."""
    return [result.graph.nodes[i] for i in result.kept_indices.tolist()]


def result_influence(result: AttributionResult) -> torch.Tensor:
    """Every node's influence on the logits, over the full graph."""
    return result.influence.detach().float().cpu()


def result_settings(result: AttributionResult) -> dict:
    """The arguments `attribute` ran with."""
    return dict(result.settings)


def result_tokens(result: AttributionResult) -> list[str]:
    """The prompt's tokens as strings."""
    return list(result.str_tokens)


SCHEMA_PATH = Path(__file__).with_name("neuronpedia_schema.json")


def load_schema() -> dict:
    """The JSON Schema (draft-07) that `export_neuronpedia`'s output satisfies."""
    return json.loads(SCHEMA_PATH.read_text())


def cantor_pair(x: int, y: int) -> int:
    """Cantor's pairing of two non-negative integers: how Neuronpedia packs (layer, index) into one id."""
    return (x + y) * (x + y + 1) // 2 + y


def export_node_id(node: NodeInfo, n_layers: int) -> str:
    """The unique string id of a node in the exported graph (see the module docstring's table)."""
    kind = node_kind(node)
    if kind == "embedding":
        return f"E_{node.feature}_{node.ctx_idx}"
    if kind == "latent":
        return f"{node.layer}_{node.feature}_{node.ctx_idx}"
    if kind == "mlp_error":
        return f"{node.layer}_err_{node.ctx_idx}"
    return f"{n_layers + 1}_{node.feature}_{node.ctx_idx}"


def export_node_ids(result: AttributionResult) -> list[str]:
    """Export ids of the kept nodes, in `result.kept_indices` order."""
    n_layers = result.graph.n_layers
    return [export_node_id(n, n_layers) for n in kept_nodes(result)]


def cumulative_influence(influence: torch.Tensor) -> torch.Tensor:
    """Per node, the share of the total influence covered by it and every more influential node."""
    infl = influence.detach().double().cpu().clamp(min=0)
    order = infl.argsort(descending=True)
    total = infl.sum()
    cum = infl[order].cumsum(0) / total if total > 0 else torch.ones_like(infl)
    out = torch.empty_like(infl)
    out[order] = cum
    return out


def pruned_edges(result: AttributionResult) -> list[tuple[int, int, float]]:
    """The pruned graph's edges as `(source position, target position, weight)` in `kept_indices` order.

    `pruned_matrix[j, i]` is the edge from kept node i to kept node j; zero entries are not edges.
    """
    M = result.pruned_matrix.detach().cpu()
    targets, sources = torch.nonzero(M, as_tuple=True)
    weights = M[targets, sources].tolist()
    return list(zip(sources.tolist(), targets.tolist(), weights))


def default_scan(model=None, transcoders: dict | None = None) -> str:
    """The model id Neuronpedia files a graph under: the model's name, else the transcoders' model name."""
    name = getattr(getattr(model, "cfg", None), "model_name", None)
    if name and name != "custom":
        return str(name).split("/")[-1]
    if transcoders:
        tc_name = getattr(getattr(next(iter(transcoders.values())).cfg, "metadata", None), "model_name", None)
        if tc_name:
            return str(tc_name)
    return "custom"


def _latent_clerps(result: AttributionResult, model, transcoders: dict | None,
                   logit_tables: dict | None = None) -> dict[tuple[int, int], str]:
    """A fallback label per kept latent from its top direct logit effects (`W_dec[f] @ W_U`)."""
    if logit_tables is None:
        if transcoders is None or model is None:
            return {}
        from .dashboard import latent_logit_tables  # local import: the dashboard imports this module

        latents = sorted({(int(n.layer), n.feature) for n in kept_nodes(result) if node_kind(n) == "latent"})
        logit_tables = latent_logit_tables(model, transcoders, latents, k=3)
    return {key: "↑ " + ", ".join(repr(tok) for tok, _ in t["top"][:3]) for key, t in logit_tables.items()}


def _round(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def build_graph_json(
    result: AttributionResult,
    model=None,
    transcoders: dict | None = None,
    slug: str = "attribution-graph",
    scan: str | None = None,
    description: str = "",
    neuronpedia_source_set: str | None = None,
    logit_tables: dict | None = None,
) -> dict:
    """The pruned graph as a Neuronpedia/circuit-tracer graph dict (see the module docstring).

    `logit_tables` (from `latent_logit_tables`) saves recomputing the latents' labels.
    """
    graph, n_layers = result.graph, result.graph.n_layers
    kept = result.kept_indices.tolist()
    ids = export_node_ids(result)
    infl = result_influence(result)
    cum = cumulative_influence(infl)
    clerps = _latent_clerps(result, model, transcoders, logit_tables)
    tokens = result_tokens(result)
    logits = [i for i in kept if node_kind(graph.nodes[i]) == "logit"]
    target_logit = max(logits, key=lambda i: graph.nodes[i].token_prob) if logits else None

    nodes = []
    for idx, node_id in zip(kept, ids):
        node = graph.nodes[idx]
        kind = node_kind(node)
        entry = {
            "node_id": node_id,
            "layer": "E" if kind == "embedding" else str(node.layer),
            "ctx_idx": int(node.ctx_idx),
            "feature_type": FEATURE_TYPES[kind],
            "clerp": node.label or "",
            "influence": _round(float(cum[idx])),
            "influence_raw": _round(float(infl[idx])),
            "activation": None,
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
        }
        if kind == "embedding":
            entry.update(feature=int(node.ctx_idx), jsNodeId=f"E_{node.feature}-{node.ctx_idx}")
        elif kind == "latent":
            layer = int(node.layer)
            entry.update(feature=cantor_pair(layer, node.feature), jsNodeId=f"{layer}_{node.feature}-0",
                         activation=_round(node.activation))
            entry["clerp"] = entry["clerp"] or clerps.get((layer, node.feature), "")
        elif kind == "mlp_error":
            entry.update(feature=-1, jsNodeId=f"{node.layer}_err_{node.ctx_idx}-0")
        else:
            entry.update(feature=int(node.feature), layer=str(n_layers + 1),
                         jsNodeId=f"L_{node.feature}-{node.ctx_idx}", token_prob=_round(node.token_prob),
                         is_target_logit=idx == target_logit)
            # Both viewers parse the probability back out of this exact "(p=...)" form.
            entry["clerp"] = f'Output "{node.str_token}" (p={node.token_prob:.3f})'
        nodes.append(entry)

    links = [{"source": ids[s], "target": ids[t], "weight": _round(w)} for s, t, w in pruned_edges(result)]

    settings = result_settings(result)
    metadata = {
        "slug": slug,
        "scan": scan or default_scan(model, transcoders),
        "prompt_tokens": tokens,
        "prompt": result.prompt,
        "schema_version": 1,
        "transcoder_list": [],
        "node_threshold": settings.get("node_threshold"),
        "pruning_settings": {k: settings[k] for k in ("node_threshold", "edge_threshold") if k in settings},
        "generation_settings": {
            **({"max_n_logits": int(settings["n_output_nodes"])} if "n_output_nodes" in settings else {}),
            **({"batch_size": int(settings["batch_size"])} if "batch_size" in settings else {}),
            # Our own keys (Neuronpedia allows any): latents kept per (layer, position), masked prefix.
            **{k: settings[k] for k in ("top_k", "start_posn") if k in settings},
        },
        "info": {
            "description": description or f"Attribution graph for {result.prompt!r}",
            "generator": {"name": "part3_attribution_graphs", "version": _version()},
            "create_time_ms": int(time.time() * 1000),
        },
    }
    if metadata["node_threshold"] is None:
        del metadata["node_threshold"]
    if neuronpedia_source_set:
        metadata["feature_details"] = {"neuronpedia_source_set": neuronpedia_source_set}

    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def _version() -> str:
    from .. import __version__

    return __version__


def export_neuronpedia(
    result: AttributionResult,
    model=None,
    transcoders: dict | None = None,
    slug: str = "attribution-graph",
    path: str | Path | None = "out/dashboard/neuronpedia.json",
    scan: str | None = None,
    neuronpedia_source_set: str | None = None,
    logit_tables: dict | None = None,
) -> dict:
    """Write the pruned graph as a Neuronpedia graph JSON (upload it at neuronpedia.org) and return it.

    Args:
        model: gives the model id (`metadata.scan`, e.g. "gemma-3-1b-it") and, with `transcoders`,
            fallback latent labels from their top logit effects.
        slug: the graph's name on Neuronpedia (letters, digits, dashes).
        path: where to write; None writes nothing.
        scan: overrides the model id.
        neuronpedia_source_set: the Neuronpedia source set the transcoders correspond to, if any.
        logit_tables: `latent_logit_tables(...)` output, if already computed.
    """
    data = build_graph_json(result, model, transcoders, slug=slug, scan=scan,
                            neuronpedia_source_set=neuronpedia_source_set, logit_tables=logit_tables)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, ensure_ascii=False))
    return data
