"""Views of an attribution graph: the HTML dashboard, Neuronpedia and circuit-tracer exports, feature
example data, and the pruning figures."""

from .circuit_tracer_export import export_circuit_tracer
from .dashboard import create_attribution_dashboard, latent_logit_tables
from .examples import (
    features_in_graph,
    inspect_feature,
    load_example_data,
    load_example_data_parallel,
    make_toy_example_data,
)
from .figures import demo_pruning, plot_cumulative_influence, random_layered_dag
from .neuronpedia import export_neuronpedia

__all__ = [
    "create_attribution_dashboard",
    "latent_logit_tables",
    "export_neuronpedia",
    "export_circuit_tracer",
    "load_example_data",
    "load_example_data_parallel",
    "features_in_graph",
    "make_toy_example_data",
    "inspect_feature",
    "demo_pruning",
    "plot_cumulative_influence",
    "random_layered_dag",
]
