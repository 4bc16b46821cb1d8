"""The per-call choice between the dense and the sparse path, eagerly and under torch.compile as vLLM runs it.

The sparse path runs on a spy: the "standin" backend (the CUTLASS layout, unpacked on every call) that records the
token count of every call it serves.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from deploy.sparse24 import BACKENDS, Sparse24Linear, Sparse24Weight, relative_error, tolerance
from wanda_serve.structure import Structure, prune_mask

THRESHOLD = 128


@pytest.fixture
def sparse_calls(monkeypatch) -> list[int]:
    """Token counts of the calls that took the sparse path of backend "spy"."""
    calls = []
    standin = BACKENDS["standin"]

    def mm(x, packed, meta, out_features):
        calls.append(x.shape[0])
        return standin.mm(x, packed, meta, out_features)

    monkeypatch.setitem(BACKENDS, "spy", dataclasses.replace(standin, mm=mm))
    return calls


def layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Sparse24Linear]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(64, 128, generator=generator)
    weight = weight.masked_fill(prune_mask(weight.abs(), Structure(n=2, m=4)), 0).to(torch.bfloat16)
    bias = torch.randn(64, generator=generator).to(torch.bfloat16)
    return weight, bias, Sparse24Linear(Sparse24Weight.pack(weight, "spy").with_thresholds(weight, THRESHOLD, THRESHOLD), bias)


def assert_same(out: torch.Tensor, expected: torch.Tensor) -> None:
    # the sparse path adds the bias after the product, dense fuses it: bf16 roundings may differ
    assert out.shape == expected.shape and relative_error(out, expected) <= tolerance(torch.bfloat16)


def test_eager_calls_take_the_dense_path_below_the_threshold_and_the_sparse_one_from_it(sparse_calls):
    weight, bias, linear = layer()
    decode = torch.randn(3, 5, 128, dtype=torch.bfloat16)  # 15 tokens
    prefill = torch.randn(2, 64, 128, dtype=torch.bfloat16)  # 128 tokens
    assert torch.equal(linear(decode), F.linear(decode, weight, bias))  # the dense weight itself
    assert_same(linear(prefill), F.linear(prefill, weight, bias))
    assert sparse_calls == [128]


def test_the_choice_is_made_per_call_under_torch_compile_as_vllm_compiles(sparse_calls):
    weight, bias, linear = layer()
    model = nn.Sequential(nn.ReLU(), linear)
    counter = CompileCounterWithBackend("aot_eager")  # AOT tracing runs the op's fake implementation
    # vLLM's settings (vllm/compilation/wrapper.py): dynamic shapes and every guard dropped, so the graph traced at
    # the first call serves every batch size, and a Python `if` on the token count would be frozen into it.
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True,
                             options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    for tokens in (4096, 1):  # traced at a large batch first, as vLLM does
        x = torch.randn(tokens, 128, dtype=torch.bfloat16)
        assert_same(compiled(x), F.linear(x.relu(), weight, bias))
    assert counter.frame_count == 1  # one graph for both sizes
    assert sparse_calls == [4096]  # 1 token took the dense path inside that graph
