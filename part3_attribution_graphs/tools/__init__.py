"""Developer tools: benchmarks and helpers that learners do not need."""
