"""The reference answers to every exercise, under the names the notebook uses.

Nothing is defined here. The exercises' references come from the registry (`exercises.py`), the helpers
the lesson gives come from the stage modules that own them, so the notebook, the autograder and the
pipeline all run the same code.
"""

from .attribution import AttributionResult, attribute, setup_attribution
from .exercises import EXERCISES
from .interventions import intervene, intervene_generate
from .nodes import GraphNodes, NodeInfo, NodeType, build_graph_nodes, build_logit_nodes
from .pruning import normalize_matrix, prune_graph
from .replacement import FreezeHooks
from .worlds.gemma import START_POSN, format_prompt

# The exercises, one name per registry record (e.g. `solutions.compute_influence`).
for _exercise in EXERCISES:
    globals()[_exercise.qualname] = _exercise.load_reference()
del _exercise

__all__ = [e.qualname for e in EXERCISES] + [
    "FreezeHooks",
    "NodeType",
    "NodeInfo",
    "GraphNodes",
    "build_logit_nodes",
    "build_graph_nodes",
    "setup_attribution",
    "normalize_matrix",
    "prune_graph",
    "AttributionResult",
    "attribute",
    "intervene",
    "intervene_generate",
    "format_prompt",
    "START_POSN",
]
