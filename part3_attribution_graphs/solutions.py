"""The reference answers to every exercise, under the names the notebook uses.

Nothing is defined here: each name is re-exported from the stage module that owns it, so the
notebook, the autograder (`tests.py`) and the pipeline all run the same code.
"""

from .attribution import (
    AttributionResult,
    attribute,
    compute_adjacency_matrix,
    prepare_backward_batches,
    setup_attribution,
)
from .interventions import intervene, intervene_generate, predicted_effects, run_with_latent_set
from .nodes import (
    GraphNodes,
    NodeInfo,
    NodeType,
    build_embedding_nodes,
    build_graph_nodes,
    build_intermediate_nodes,
    build_logit_nodes,
    compute_salient_logits,
)
from .pruning import compute_influence, normalize_matrix, prune_edges, prune_graph, prune_nodes
from .replacement import FreezeHooks, TranscoderReplacementHooks
from .worlds.gemma import START_POSN, format_prompt

__all__ = [
    "FreezeHooks",
    "TranscoderReplacementHooks",
    "compute_salient_logits",
    "NodeType",
    "NodeInfo",
    "GraphNodes",
    "build_embedding_nodes",
    "build_intermediate_nodes",
    "build_logit_nodes",
    "build_graph_nodes",
    "setup_attribution",
    "prepare_backward_batches",
    "compute_adjacency_matrix",
    "normalize_matrix",
    "compute_influence",
    "prune_nodes",
    "prune_edges",
    "prune_graph",
    "AttributionResult",
    "attribute",
    "run_with_latent_set",
    "intervene",
    "intervene_generate",
    "predicted_effects",
    "format_prompt",
    "START_POSN",
]
