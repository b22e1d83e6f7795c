"""Export a pruned attribution graph as JSON in Neuronpedia's graph format.

The format is the one Neuronpedia's graph viewer and circuit-tracer's local frontend both read
(described by `apps/webapp/app/api/graph/graph-schema.json` in the Neuronpedia repository; our own
JSON Schema for it is `neuronpedia_schema.json` beside this file). Top level: `metadata`,
`qParams`, `nodes`, `links`.

Node conventions follow circuit-tracer's `frontend/graph_models.py`, so both viewers decode them.
`node_id` is `NodeInfo.node_id` (the one id function of the package: `nodes.json`, the dashboard and
this export agree); both viewers treat it as an opaque key.

| our node      | node_id              | feature      | layer            | feature_type                 |
|---------------|----------------------|--------------|------------------|------------------------------|
| embedding     | `E_{token id}_{pos}` | pos          | `"E"`            | `"embedding"`                |
| latent (l, f) | `{l}_{f}_{pos}`      | cantor(l, f) | `"l"`            | `"cross layer transcoder"`   |
| MLP error (l) | `{l}_err_{pos}`      | -1           | `"l"`            | `"mlp reconstruction error"` |
| logit (v)     | `L_{v}_{pos}`        | v            | `"{n_layers+1}"` | `"logit"`                    |

`metadata.schema_version = 1` tells Neuronpedia that latent `feature`s are Cantor pairs of
(layer, index). circuit-tracer names error nodes `0_{l}_{pos}`, which collides with latent ids of
layer 0; ours keep an `err` tag instead so every id is unique.

What the viewers show (`view_graph`) is the pruned graph as circuit-tracer shows its own: a latent
needs an incoming and an outgoing edge and an error node an outgoing one (dropped until none is left
without), and every prompt token has its embedding node, pruned or not.

A node's `influence` is the viewers' pruning score: the cumulative share of total influence reached
when nodes are sorted by influence and this node is included (small = important), as in
circuit-tracer. The raw influence is kept in `influence_raw`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..guard import guarded
from ..nodes import NodeInfo
from ..result import AttributionResult

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

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
    "ViewGraph",
    "view_graph",
    "cumulative_influence",
    "pruned_edges",
    "default_scan",
    "build_graph_json",
    "export_neuronpedia",
    "saved_state",
    "apply_state",
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


def export_node_id(node: NodeInfo) -> str:
    """The node's id in every export: `NodeInfo.node_id` (a look-alike node class without it borrows it)."""
    node_id = getattr(node, "node_id", None)
    return node_id if isinstance(node_id, str) else NodeInfo.node_id.fget(node)


def export_node_ids(result: AttributionResult) -> list[str]:
    """Export ids of the nodes the viewers show, in `view_graph(result).indices` order."""
    return [export_node_id(result.graph.nodes[i]) for i in view_graph(result).indices]


@dataclass
class ViewGraph:
    """The graph the viewers show: graph node indices (sorted) and edges between their positions."""

    indices: list[int]
    edges: list[tuple[int, int, float]]  # (source position, target position, weight)
    dropped: list[int]  # kept graph indices that the view leaves out (no incoming/outgoing edge)


def view_graph(result: AttributionResult) -> ViewGraph:
    """The pruned graph with circuit-tracer's last clean-up, plus an embedding node for every token.

    Repeats until nothing changes: a latent without an incoming or an outgoing edge goes, an error
    node without an outgoing edge goes (with their edges). Logit nodes always stay.
    """
    nodes = result.graph.nodes
    kept = result.kept_indices.tolist()
    M = result.pruned_matrix.detach().cpu() != 0  # M[target, source]
    kinds = [node_kind(nodes[i]) for i in kept]
    latent = torch.tensor([k == "latent" for k in kinds], dtype=torch.bool)
    error = torch.tensor([k == "mlp_error" for k in kinds], dtype=torch.bool)
    alive = torch.ones(len(kept), dtype=torch.bool)
    while True:
        live = M & alive[:, None] & alive[None, :]
        has_in, has_out = live.any(dim=1), live.any(dim=0)
        now = alive & ~(latent & ~(has_in & has_out)) & ~(error & ~has_out)
        if torch.equal(now, alive):
            break
        alive = now
    keep_pos = torch.where(alive)[0].tolist()
    indices = sorted(
        {kept[p] for p in keep_pos} | {i for i, n in enumerate(nodes) if node_kind(n) == "embedding"}
    )
    where = {g: k for k, g in enumerate(indices)}
    W = result.pruned_matrix.detach().cpu()
    targets, sources = torch.nonzero(W * (alive[:, None] & alive[None, :]), as_tuple=True)
    weights = W[targets, sources].tolist()
    edges = [
        (where[kept[s]], where[kept[t]], w) for s, t, w in zip(sources.tolist(), targets.tolist(), weights)
    ]
    dropped = [kept[p] for p in torch.where(~alive)[0].tolist()]
    return ViewGraph(indices, edges, dropped)


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


# Without the model an export draws the graph and names no latent; transcoders alone only name the scan.
_OPTIONAL_WORLD = dict(model="model", transcoders="transcoders", optional=("model", "transcoders"))


@guarded(**_OPTIONAL_WORLD)
def default_scan(model: HookedSAETransformer | None = None, transcoders: dict | None = None) -> str:
    """The model id Neuronpedia files a graph under: the model's name, else the transcoders' model name."""
    name = getattr(getattr(model, "cfg", None), "model_name", None)
    if name and name != "custom":
        return str(name).split("/")[-1]
    if transcoders:
        tc_name = getattr(getattr(next(iter(transcoders.values())).cfg, "metadata", None), "model_name", None)
        if tc_name:
            return str(tc_name)
    return "custom"


def _latent_clerps(
    result: AttributionResult, model, transcoders: dict | None, logit_tables: dict | None = None
) -> dict[tuple[int, int], str]:
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


@guarded(result="result", **_OPTIONAL_WORLD)
def build_graph_json(
    result: AttributionResult,
    model: HookedSAETransformer | None = None,
    transcoders: dict | None = None,
    slug: str = "attribution-graph",
    scan: str | None = None,
    description: str = "",
    neuronpedia_source_set: str | None = None,
    logit_tables: dict | None = None,
    state: dict | None = None,
) -> dict:
    """The pruned graph as a Neuronpedia/circuit-tracer graph dict (see the module docstring).

    `logit_tables` (from `latent_logit_tables`) saves recomputing the latents' labels; `state` (from
    `saved_state`) restores a saved viewer state (pins, supernodes, labels) for nodes that still exist.
    """
    graph, n_layers = result.graph, result.graph.n_layers
    view = view_graph(result)
    kept = view.indices
    ids = [export_node_id(graph.nodes[i]) for i in kept]
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
            entry.update(
                feature=cantor_pair(layer, node.feature),
                jsNodeId=f"{layer}_{node.feature}-0",
                activation=_round(node.activation),
            )
            entry["clerp"] = entry["clerp"] or clerps.get((layer, node.feature), "")
        elif kind == "mlp_error":
            entry.update(feature=-1, jsNodeId=f"{node.layer}_err_{node.ctx_idx}-0")
        else:
            entry.update(
                feature=int(node.feature),
                layer=str(n_layers + 1),
                jsNodeId=f"L_{node.feature}-{node.ctx_idx}",
                token_prob=_round(node.token_prob),
                is_target_logit=idx == target_logit,
            )
            # Both viewers parse the probability back out of this exact "(p=...)" form.
            entry["clerp"] = f'Output "{node.str_token}" (p={node.token_prob:.3f})'
        nodes.append(entry)

    links = [{"source": ids[s], "target": ids[t], "weight": _round(w)} for s, t, w in view.edges]

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
    if state:
        apply_state(nodes, q_params, state)
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def saved_state(graph_json: dict) -> dict:
    """The viewer state a saved graph JSON carries: `{"qParams": {...}, "labels": {node_id: label}}`.

    Our dashboard saves its user-edited labels as `qParams.labels` (an extra key both viewers ignore);
    the pins, supernodes, clicked node and thresholds are in the `qParams` keys Neuronpedia reads.
    """
    q = dict(graph_json.get("qParams") or {})
    labels = {str(k): str(v) for k, v in (q.pop("labels", None) or {}).items()}
    return {"qParams": q, "labels": labels}


def apply_state(nodes: list[dict], q_params: dict, state: dict) -> None:
    """Put a saved state into an export: keep the pins and supernodes of nodes that still exist."""
    ids = {n["node_id"] for n in nodes}
    q = state.get("qParams") or {}
    pinned = q.get("pinnedIds") or []
    if isinstance(pinned, str):  # Neuronpedia's URLs write them comma-separated
        pinned = [p for p in pinned.split(",") if p]
    q_params["pinnedIds"] = [p for p in pinned if p in ids]
    q_params["supernodes"] = [
        [str(sn[0]), *[m for m in sn[1:] if m in ids]]
        for sn in q.get("supernodes") or []
        if sn and any(m in ids for m in sn[1:])
    ]
    q_params["clickedId"] = q.get("clickedId", "") if q.get("clickedId", "") in ids else ""
    if q.get("hiddenIds"):  # our dashboard's own key: nodes left out of the drawing
        q_params["hiddenIds"] = [h for h in q["hiddenIds"] if h in ids]
    for key in ("node_threshold", "edge_threshold", "linkType", "sg_pos"):
        if key in q:
            q_params[key] = q[key]
    labels = {k: v for k, v in (state.get("labels") or {}).items() if k in ids}
    if labels:
        q_params["labels"] = labels
        for n in nodes:
            if n["node_id"] in labels:
                n["clerp"] = labels[n["node_id"]]


def _version() -> str:
    from .. import __version__

    return __version__


@guarded(result="result", **_OPTIONAL_WORLD)
def export_neuronpedia(
    result: AttributionResult,
    model: HookedSAETransformer | None = None,
    transcoders: dict | None = None,
    slug: str = "attribution-graph",
    path: str | Path | None = "out/dashboard/neuronpedia.json",
    scan: str | None = None,
    neuronpedia_source_set: str | None = None,
    logit_tables: dict | None = None,
    state: dict | None = None,
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
        state: a saved viewer state (`saved_state(...)`) to carry into the export.
    """
    data = build_graph_json(
        result,
        model,
        transcoders,
        slug=slug,
        scan=scan,
        neuronpedia_source_set=neuronpedia_source_set,
        logit_tables=logit_tables,
        state=state,
    )
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, ensure_ascii=False))
    return data
