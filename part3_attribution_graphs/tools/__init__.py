"""Developer tools that learners never import: the notebook builder (`python -m
part3_attribution_graphs.tools.notebook_builder`), the speed benchmarks (`tools.bench`, `tools.gpu_bench`,
`tools.memory`, `tools.bench_dashboard`), the circuit-tracer cross-check (`tools.crosscheck`) and the headless
Chromium client the browser tests and the dashboard benchmark share (`tools.chromium`)."""
