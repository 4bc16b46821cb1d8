"""Deploy: vLLM serving and dense-vs-pruned benchmarks (see the deploy issue)."""
