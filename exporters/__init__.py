"""Exporters: pruned model -> vLLM-loadable checkpoint and ONNX (see the export issue)."""
