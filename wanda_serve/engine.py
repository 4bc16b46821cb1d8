"""The layer-by-layer pruning engine, shared by every method and generic over HF decoder models.

Capture what the model passes to its first decoder block (hidden states, attention mask,
position ids, rotary embeddings, ...), then for each block: collect the method's input statistic
with forward hooks, prune the block's linear layers, and rerun the block so that the *pruned*
outputs feed the next one. Only the block being pruned needs to be on `device`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from wanda_serve.errors import WandaServeError
from wanda_serve.methods import Method
from wanda_serve.structure import Structure


def find_linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def find_decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The longest ModuleList of identical modules that hold linear layers: the decoder stack."""
    best = None
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and len({type(block) for block in module}) == 1
            and find_linears(module[0])
            and (best is None or len(module) > len(best))
        ):
            best = module
    if best is None:
        raise WandaServeError(f"unsupported architecture {type(model).__name__}: no decoder blocks with linear layers found")
    return best


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every prunable linear layer, named 'block index.layer name'. Embeddings and lm_head are never included."""
    return {
        f"{index}.{name}": linear
        for index, block in enumerate(find_decoder_blocks(model))
        for name, linear in find_linears(block).items()
    }


def check_structure_fits(model: nn.Module, structure: Structure) -> None:
    for name, linear in block_linears(model).items():
        structure.check_width(linear.in_features, name)


@dataclass
class BlockCall:
    """One recorded call of a decoder block: the hidden states and everything else it was passed."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class _BlockInputsCaptured(Exception):
    pass


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> list[BlockCall]:
    """Run the model up to its first decoder block for each batch of token ids and record that call."""
    first_block = find_decoder_blocks(model)[0]
    calls = []

    def record(module, args, kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        calls.append(BlockCall(hidden.to(device), _to_device(rest, device), _to_device(kwargs, device)))
        raise _BlockInputsCaptured

    handle = first_block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model_device = next(model.parameters()).device
        for ids in batches:
            try:
                model(input_ids=ids.to(model_device), use_cache=False)
            except _BlockInputsCaptured:
                pass
    finally:
        handle.remove()
    return calls


@dataclass
class PruneTimings:
    mask_seconds: float = 0.0
    forward_seconds: float = 0.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prune_linears(linears: dict[str, nn.Linear], method: Method, stats: dict, structure: Structure, device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for name, linear in linears.items():
        linear.weight.data = method.prune(linear.weight.data, stats.get(name), structure)
    _synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def prune_model(
    model: nn.Module,
    batches: list[torch.Tensor],
    method: Method,
    structure: Structure,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> PruneTimings:
    """Prune every linear layer of every decoder block of `model` in place."""
    device = torch.device(device)
    check_structure_fits(model, structure)
    blocks = find_decoder_blocks(model)
    timings = PruneTimings()
    calls = capture_block_inputs(model, batches, device) if method.statistic is not None else []
    hidden = [call.hidden for call in calls]

    for block in tqdm(blocks, desc="pruning blocks", disable=not progress):
        home = next(block.parameters()).device
        block.to(device)
        linears = find_linears(block)
        stats = {}
        if method.statistic is not None:
            stats = {name: method.statistic(linear.in_features, device) for name, linear in linears.items()}
            handles = [
                linear.register_forward_hook(lambda mod, inp, out, stat=stats[name]: stat.add_batch(inp[0]))
                for name, linear in linears.items()
            ]
            try:
                timings.forward_seconds += _timed_forward(block, calls, hidden, device)[1]
            finally:
                for handle in handles:
                    handle.remove()
        timings.mask_seconds += _prune_linears(linears, method, stats, structure, device)
        if calls:
            hidden, seconds = _timed_forward(block, calls, hidden, device)
            timings.forward_seconds += seconds
        block.to(home)
    return timings


def _timed_forward(block, calls: list[BlockCall], hidden: list[torch.Tensor], device) -> tuple[list[torch.Tensor], float]:
    _synchronize(device)
    start = time.perf_counter()
    outputs = [call.run(block, h) for call, h in zip(calls, hidden)]
    _synchronize(device)
    return outputs, time.perf_counter() - start
