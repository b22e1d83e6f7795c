"""The helpers the notebooks call as `utils.*`: the dashboard, exports, feature example data, the
pruning figures, and parallel transcoder loading."""

from .views.circuit_tracer_export import export_circuit_tracer
from .views.dashboard import create_attribution_dashboard
from .views.examples import (
    features_in_graph,
    inspect_feature,
    load_example_data,
    load_example_data_parallel,
    make_toy_example_data,
)
from .views.figures import demo_pruning, plot_cumulative_influence
from .views.neuronpedia import export_neuronpedia
from .worlds.gemma import load_saes_parallel

__all__ = [
    "create_attribution_dashboard",
    "export_neuronpedia",
    "export_circuit_tracer",
    "load_example_data",
    "load_example_data_parallel",
    "features_in_graph",
    "make_toy_example_data",
    "inspect_feature",
    "demo_pruning",
    "plot_cumulative_influence",
    "load_saes_parallel",
]
