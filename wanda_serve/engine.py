"""The layer-by-layer pruning engine, shared by every method and generic over HF decoder models.

Capture what the model passes to its first decoder block (hidden states, attention mask,
position ids, rotary embeddings, ...), then for each block: collect the method's input statistic
with forward hooks, prune the block's linear layers, and rerun the block so that the *pruned*
outputs feed the next one. Only the block being pruned needs to be on `device`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from wanda_serve.errors import WandaServeError
from wanda_serve.methods import InputNorms, Method, wanda_scores
from wanda_serve.permute import Fold, exact_folds, kept_score, spreading_permutation
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
    block_sparsity: list[float] | None = None  # per decoder block, when OWL chose them
    permutations: dict[str, dict] = field(default_factory=dict)  # per permuted layer: what it folded into, score kept


@dataclass(frozen=True)
class Owl:
    """OWL (Yin et al. 2024): blocks with more activation outliers keep more weights.

    A block's outlier ratio is the share of its Wanda scores above `outlier_factor` times their
    mean; sparsities are spread linearly over target ± `spread` by that ratio, averaging the target.
    """

    spread: float = 0.08  # the paper's λ
    outlier_factor: float = 5.0  # the paper's M

    def check_applies(self, structure: Structure) -> None:
        if structure.is_nm:
            raise WandaServeError(f"OWL spreads an unstructured ratio over the layers; {structure} is N:M, give a ratio such as 0.5")
        if not (0 < structure.ratio - self.spread and structure.ratio + self.spread < 1):
            raise WandaServeError(f"--owl-spread {self.spread:g} around --structure {structure} puts block sparsities outside (0, 1); "
                                  f"use a spread below {min(structure.ratio, 1 - structure.ratio):g}")

    def block_sparsities(self, outlier_ratios: list[float], target: float) -> list[float]:
        ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
        span = ratios.max() - ratios.min()
        scaled = (ratios - ratios.min()) / span * 2 * self.spread if span > 0 else torch.zeros_like(ratios)
        return (target - (scaled - scaled.mean())).tolist()


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


def _permute_for_nm(folds: list[Fold], linears: dict[str, nn.Linear], stats: dict, method: Method, structure: Structure,
                    index: int) -> dict[str, dict]:
    """Permute the input channels of each layer where that folds exactly, to keep more score under the N:M mask."""
    score_fn = method.scores or wanda_scores  # SparseGPT: Wanda's scores, from its Hessian's diagonal
    report = {}
    for fold in folds:
        scores = score_fn(linears[fold.consumer].weight.float(), stats.get(fold.consumer))
        perm = spreading_permutation(scores, structure)
        fold.apply(linears, perm)
        if fold.consumer in stats:
            stats[fold.consumer].permute(perm)
        report[f"{index}.{fold.consumer}"] = {
            "folded_into": [f"{index}.{name}" for name in fold.producers],
            "kept_score_ratio": kept_score(scores[:, perm], structure) / kept_score(scores, structure),
        }
    return report


def _collect_statistics(block, linears: dict[str, nn.Linear], statistic: type, calls: list[BlockCall],
                        hidden: list[torch.Tensor], device) -> tuple[dict, list[torch.Tensor], float]:
    """Run the block with a hook on each linear layer feeding `statistic`; the statistics, outputs and seconds."""
    stats = {name: statistic(linear.in_features, device) for name, linear in linears.items()}
    handles = [linear.register_forward_hook(lambda mod, inp, out, stat=stats[name]: stat.add_batch(inp[0]))
               for name, linear in linears.items()]
    try:
        outputs, seconds = _timed_forward(block, calls, hidden, device)
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs, seconds


@torch.no_grad()
def block_outlier_ratios(blocks: nn.ModuleList, calls: list[BlockCall], device, outlier_factor: float) -> list[float]:
    """OWL's statistic for each block of the dense model: the share of Wanda scores above outlier_factor × their mean."""
    hidden = [call.hidden for call in calls]
    ratios = []
    for block in blocks:
        home = next(block.parameters()).device
        block.to(device)
        linears = find_linears(block)
        stats, hidden, _ = _collect_statistics(block, linears, InputNorms, calls, hidden, device)
        scores = torch.cat([wanda_scores(linear.weight.float(), stats[name]).flatten() for name, linear in linears.items()])
        ratios.append(float((scores > outlier_factor * scores.mean()).float().mean()))
        block.to(home)
    return ratios


@torch.no_grad()
def prune_model(
    model: nn.Module,
    batches: list[torch.Tensor],
    method: Method,
    structure: Structure,
    device: torch.device | str = "cpu",
    progress: bool = True,
    owl: Owl | None = None,
    permute: bool = False,
) -> PruneTimings:
    """Prune every linear layer of every decoder block of `model` in place.

    With `owl`, an unstructured target is spread over the blocks by their outlier ratios (one more
    calibration pass over the dense model first). With `permute`, an N:M target is preceded by the
    input-channel permutations that fold exactly into each block (permute.py).
    """
    device = torch.device(device)
    check_structure_fits(model, structure)
    blocks = find_decoder_blocks(model)
    timings = PruneTimings()
    if owl is not None:
        owl.check_applies(structure)
    if permute and not structure.is_nm:
        raise WandaServeError(f"channel permutation spreads weights over the groups of an N:M pattern; {structure} is not N:M")
    needs_calibration = method.statistic is not None or owl is not None or permute
    calls = capture_block_inputs(model, batches, device) if needs_calibration else []
    block_structures = [structure] * len(blocks)
    if owl is not None:
        start = time.perf_counter()
        outlier_ratios = block_outlier_ratios(blocks, calls, device, owl.outlier_factor)
        timings.forward_seconds += time.perf_counter() - start
        timings.block_sparsity = owl.block_sparsities(outlier_ratios, structure.ratio)
        block_structures = [Structure(ratio=ratio) for ratio in timings.block_sparsity]
    hidden = [call.hidden for call in calls]
    folds = None

    for index, (block, block_structure) in enumerate(tqdm(list(zip(blocks, block_structures)), desc="pruning blocks",
                                                          disable=not progress)):
        home = next(block.parameters()).device
        block.to(device)
        linears = find_linears(block)
        stats = {}
        if method.statistic is not None:
            stats, _, seconds = _collect_statistics(block, linears, method.statistic, calls, hidden, device)
            timings.forward_seconds += seconds
        if permute:
            start = time.perf_counter()
            if folds is None:  # the blocks are identical modules: what folds in the first folds in all
                folds = exact_folds(block, linears, lambda: calls[0].run(block, hidden[0]))
            timings.permutations.update(_permute_for_nm(folds, linears, stats, method, structure, index))
            timings.mask_seconds += time.perf_counter() - start
        timings.mask_seconds += _prune_linears(linears, method, stats, block_structure, device)
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
