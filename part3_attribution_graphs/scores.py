"""How much of the model a graph explains: the replacement and completeness scores.

Both scores come from the circuit-tracing paper (Ameisen et al., 2025, "Circuit Tracing: Revealing
Computational Graphs in Language Models", section on graph evaluation) and are computed as in
circuit-tracer's `compute_graph_scores`. Both use the same influence as pruning: take |A|, divide
each row by its sum (B), and push the logit probabilities backwards through the graph,
`influence = w B + w B^2 + ...`. Each node then holds the share of the output that flows through it.
"""

from __future__ import annotations

import torch

from .guard import guarded
from .nodes import NodeType
from .pruning import compute_influence, normalize_matrix
from .result import AttributionResult

__all__ = ["compute_graph_scores"]


@guarded(result="result")
def compute_graph_scores(result: AttributionResult) -> dict[str, float]:
    """The replacement score and the completeness score of a full (unpruned) attribution graph.

    Replacement score: the logit weight, pushed backwards along the edges, ends up at nodes that
    receive no edges: the embeddings and the error nodes. The replacement score is the share that
    ends at embeddings, `influence(embeddings) / (influence(embeddings) + influence(errors))`: the
    fraction of the input-to-output paths (weighted by their strength) that run through latents
    only. It is 1 when the errors explain nothing, and it gives no credit for a path that meets an
    error node anywhere along the way.

    Completeness score: for each node, the share of its incoming |edges| that does *not* come from
    error nodes (1 for nodes without incoming edges), averaged with weights `influence + logit
    weight`, i.e. by how much the node matters to the output. It gives partial credit: a node that
    is 90% explained by latents and embeddings counts 0.9.

    Both are computed on the whole graph (run before pruning), in float64. Error nodes that hold
    latents outside the `top_k` and embeddings of the masked prefix (which send no edges) are
    treated as they are in the graph, so a smaller `top_k` lowers both scores.

    Returns:
        `{"replacement_score": float, "completeness_score": float}`, each in [0, 1].
    """
    A = result.adjacency_matrix.detach().double().cpu()
    kinds = [node.node_type for node in result.graph.nodes]
    is_error = torch.tensor([k == NodeType.MLP_ERROR for k in kinds])
    is_embedding = torch.tensor([k == NodeType.EMBEDDING for k in kinds])
    is_logit = torch.tensor([k == NodeType.LOGIT for k in kinds])
    if not is_logit[-int(is_logit.sum()) :].all():
        raise ValueError("The logit nodes must come last in the graph (as `attribute` builds it).")

    logit_weights = result.logit_weights
    w = torch.zeros(A.shape[0], dtype=torch.float64)
    w[is_logit] = logit_weights.detach().double().cpu()
    influence = compute_influence(A, logit_weights.detach().double().cpu(), result.graph.n_layers)

    from_embeddings, from_errors = influence[is_embedding].sum(), influence[is_error].sum()
    replacement = from_embeddings / (from_embeddings + from_errors)

    B = normalize_matrix(A)
    not_from_errors = 1 - B[:, is_error].sum(dim=1)
    weight = influence + w
    completeness = (not_from_errors * weight).sum() / weight.sum()
    return {"replacement_score": float(replacement), "completeness_score": float(completeness)}
