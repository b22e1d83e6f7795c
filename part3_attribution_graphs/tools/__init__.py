"""Developer tools, never imported by the notebooks or the pipeline: the notebook builder
(`python -m part3_attribution_graphs.tools.notebook_builder`) and the circuit-tracer cross-check
(`part3_attribution_graphs.tools.crosscheck`)."""
