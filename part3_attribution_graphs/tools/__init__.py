"""Developer tools (benchmarks, cross-checks, the notebook builder): never imported by the lesson."""
