"""The layer-by-layer pruning engine, shared by every method and generic over HF decoder models.

Capture what the model passes to its first decoder block (hidden states, attention mask,
position ids, rotary embeddings, ...), then for each block: collect the method's input statistic
with forward hooks, prune the block's linear layers, and rerun the block so that the *pruned*
outputs feed the next one. Only the block being pruned needs to be on `device`.

With block order, a block's linear layers are pruned stage by stage in the order its forward pass
calls them (q/k/v, then o, then gate/up, then down), each stage's statistic collected from the
block with the earlier stages already pruned, as SparseGPT's reference does. With refinement, the
pruned block's surviving weights are then fitted to the dense block's outputs.
"""

from __future__ import annotations

import ctypes
import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from wanda_serve.checkpoint import PruneCheckpoint
from wanda_serve.errors import WandaServeError
from wanda_serve.methods import InputNorms, Method, wanda_scores
from wanda_serve.permute import Fold, exact_folds, kept_score, spreading_permutation
from wanda_serve.structure import KeptZeros, Structure


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
    """One recorded call of a decoder block: everything it was passed besides the hidden states, which are the
    previous block's outputs and so change block by block (capture_block_inputs returns the first block's apart)."""

    batch: int  # samples in the call
    args: tuple
    kwargs: dict

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def rows(self, rows: list[int]) -> BlockCall:
        """This call for some of its samples: every tensor whose leading dimension is the batch (hidden states,
        OPT's position ids, a padded attention mask) keeps those rows; batch-1 tensors broadcast and stay."""
        index = torch.tensor(rows)
        pick = lambda t: t.index_select(0, index.to(t.device)) if t.dim() >= 2 and t.shape[0] == self.batch else t  # noqa: E731
        return BlockCall(len(rows), _map_tensors(self.args, pick), _map_tensors(self.kwargs, pick))

    def in_float32(self) -> BlockCall:
        """This call with its inputs (rotary embeddings, masks) in float32, for a block run in float32."""
        return BlockCall(self.batch, _as_float32(self.args), _as_float32(self.kwargs))


class _BlockInputsCaptured(Exception):
    pass


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _as_float32(value):
    return _map_tensors(value, lambda tensor: tensor.float() if tensor.is_floating_point() else tensor)


@contextmanager
def _in_float32(block: nn.Module):
    """The block's parameters in float32 while inside, then back in their dtype (bfloat16 and float16 go to
    float32 and back exactly)."""
    dtype = next(block.parameters()).dtype
    block.float()
    try:
        yield
    finally:
        block.to(dtype)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: list[torch.Tensor],
                         device: torch.device) -> tuple[list[list[BlockCall]], list[torch.Tensor]]:
    """For each batch of token ids, the call of each decoder block (block_calls[block][batch]), and the first
    block's hidden states.

    The model runs with every block passing its input through, so it builds what each block is passed itself, at
    the cost of the embeddings: models that mix sliding-window and full attention (Gemma 2 and 3, GPT-OSS) give
    their layers different attention masks and rotary embeddings, and replaying the first block's for all would
    calibrate the others on inputs they never see.
    """
    blocks = find_decoder_blocks(model)
    block_calls: list[list[BlockCall]] = [[] for _ in blocks]
    hidden_states = []
    moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one copy on `device` of what every block is passed

    def to_device(value):
        # The originals stay referenced while a batch runs, so no other tensor can take their id.
        return _map_tensors(value, lambda tensor: moved.setdefault(id(tensor), (tensor, tensor.to(device)))[1])

    def passthrough(index: int):
        def forward(*args, **kwargs):
            if args:
                hidden, rest = args[0], args[1:]
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            if index == 0:
                hidden_states.append(hidden.to(device))
            block_calls[index].append(BlockCall(hidden.shape[0], to_device(rest), to_device(kwargs)))
            if index == len(blocks) - 1:
                raise _BlockInputsCaptured  # the final norm and the LM head are not needed
            return hidden
        return forward

    for index, block in enumerate(blocks):
        block.forward = passthrough(index)
    try:
        model_device = next(model.parameters()).device
        for ids in batches:
            moved.clear()
            try:
                model(input_ids=ids.to(model_device), use_cache=False)
            except _BlockInputsCaptured:
                pass
    finally:
        for block in blocks:
            del block.forward  # the class's own again
    missed = [index for index, calls in enumerate(block_calls) if len(calls) != len(batches)]
    if missed:
        raise WandaServeError(f"unsupported architecture {type(model).__name__}: its forward pass did not call decoder "
                              f"block(s) {missed} once per batch")
    return block_calls, hidden_states


@dataclass
class PruneRecord:
    """What prune_model did, for the report: where its time went and what it chose on the way."""

    mask_seconds: float = 0.0  # choosing masks and updating weights (forward passes excluded, as the Wanda paper reports)
    forward_seconds: float = 0.0  # running blocks over the calibration samples
    block_sparsity: list[float] | None = None  # per decoder block, when OWL chose them
    permutations: dict[str, dict] = field(default_factory=dict)  # per permuted layer: what it folded into, score kept
    stages: list[list[str]] | None = None  # with block order: the stages of the (identical) blocks
    refined: list[dict] = field(default_factory=list)  # per block, with refinement: output error before and after, kept or undone

    @contextmanager
    def timing(self, kind: str, device: torch.device):
        """Add the time the body takes to `{kind}_seconds` (kind: mask or forward), the device's queue drained."""
        _synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(device)
            setattr(self, f"{kind}_seconds", getattr(self, f"{kind}_seconds") + time.perf_counter() - start)


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


def _prune_linears(linears: dict[str, nn.Linear], method: Method, stats: dict, structure: Structure) -> None:
    for name, linear in linears.items():
        linear.weight.data = method.prune(linear.weight.data, stats.get(name), structure)


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


def block_stages(linears: dict[str, nn.Linear], run_block) -> list[list[str]]:
    """The linear layers in the order `run_block` calls them, in stages of consecutive layers that read the
    same input tensor (q/k/v; gate/up): a stage's input depends only on the stages before it."""
    called: dict[str, torch.Tensor] = {}
    handles = [linear.register_forward_pre_hook(lambda mod, args, name=name: called.setdefault(name, args[0]))
               for name, linear in linears.items()]
    try:
        run_block()
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    previous = None
    for name, inp in called.items():
        if inp is previous:
            stages[-1].append(name)
        else:
            stages.append([name])
        previous = inp
    uncalled = [name for name in linears if name not in called]  # no input, so no statistic either way
    return stages + ([uncalled] if uncalled else [])


class _StageInputsCollected(Exception):
    pass


def block_statistics(block, linears: dict[str, nn.Linear], statistic: type, calls: list[BlockCall],
                     hidden: list[torch.Tensor], device, stop_after: str | None = None,
                     keep_outputs: bool = True) -> tuple[dict, list | None]:
    """Run the block with a hook on each linear layer feeding `statistic`: the statistics and the block's outputs
    (None without `keep_outputs`: a pass over dense weights whose outputs nobody reads should not hold them all).

    With `stop_after`, each call stops once that layer has run (the rest of the block is not needed): no outputs.
    """
    stats = {name: statistic(linear.in_features, device) for name, linear in linears.items()}

    def collect(name: str):
        def hook(module, inp, out):
            stats[name].add_batch(inp[0])
            if name == stop_after:
                raise _StageInputsCollected
        return hook

    handles = [linear.register_forward_hook(collect(name)) for name, linear in linears.items()]
    try:
        if stop_after is None and keep_outputs:
            return stats, run_block(block, calls, hidden)
        for call, h in zip(calls, hidden):
            try:
                call.run(block, h)
            except _StageInputsCollected:
                pass
        return stats, None
    finally:
        for handle in handles:
            handle.remove()


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc: its allocator is not the one that holds on
        return None


def release_freed_memory() -> None:
    """Hand the memory the finished block's activations occupied back to the system. glibc keeps freed
    buffers below its mmap threshold (which grows to 32 MiB as large buffers come and go) for reuse, and
    with activations of changing sizes the process grew block by block: about 1 GB more than it holds
    over the 1.5B model's 28 blocks. A fixed mmap threshold instead costs every activation its page
    faults (SmolLM2's prune took 1.6x as long); one trim per block costs about nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def run_block(block, calls: list[BlockCall], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """The block's outputs for each calibration call, given its hidden-state inputs."""
    return [call.run(block, h) for call, h in zip(calls, hidden)]


def advance(block, calls: list[BlockCall], hidden: list[torch.Tensor]) -> None:
    """Replace each call's hidden states by the block's outputs, one call at a time: the calibration activations
    are held once plus one call's, where a new list beside the old held them twice (0.2 GB on the 1.5B model)."""
    for index, call in enumerate(calls):
        hidden[index] = call.run(block, hidden[index])


@dataclass(frozen=True)
class Refine:
    """Block-output refinement (Wanda++'s regional optimization): after a block is pruned, `steps` Adam steps
    on its surviving linear weights, the mask held exactly, minimising the mean squared error between the
    dense block's outputs and the pruned block's on `batch` calibration samples per step, drawn from all of
    them whatever --batch-size grouped them into. In float32, one block at a time, whatever the model's dtype.

    The learning rate is relative: each linear steps by `lr` × the mean |w| of its surviving weights, since
    an Adam step moves every weight by about lr whatever its size. An absolute 3e-3, right for SmolLM2
    (mean |w| ~0.15), moved Qwen2.5-Coder-1.5B's weights (~0.01) so far that every block got 10^2-10^4 times
    worse."""

    steps: int
    # Chosen on held-out calibration windows at 10 steps, on SmolLM2 and Qwen2.5-Coder-1.5B (docs/refine_settings*.md):
    # each block's best ranged from 0.0025 (Qwen's last) to 0.02 (SmolLM2's first). 0.01 came within 13% of the best
    # in every block of both; 0.005 was 28% off in SmolLM2's block 0, 0.02 16% and 42% off in Qwen's blocks 14 and 27.
    lr: float = 0.01
    batch: int = 8
    seed: int = 0

    def __call__(self, block: nn.Module, linears: dict[str, nn.Linear], calls: list[BlockCall],
                 hidden: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        calls = [call.in_float32() for call in calls]
        hidden, targets = _as_float32(hidden), _as_float32(targets)
        with _in_float32(block):
            self._fit(block, linears, calls, hidden, targets)

    def _fit(self, block: nn.Module, linears: dict[str, nn.Linear], calls: list[BlockCall], hidden: list[torch.Tensor],
             targets: list[torch.Tensor]) -> None:
        weights = [linear.weight for linear in linears.values()]
        trainable = {id(w) for w in weights}
        requires_grad = {p: p.requires_grad for p in block.parameters()}
        for p in block.parameters():
            p.requires_grad_(id(p) in trainable)
        zeros = KeptZeros(weights)
        optimizer = torch.optim.Adam([{"params": [w], "lr": self.lr * mean_magnitude(w)} for w in weights])
        generator = torch.Generator().manual_seed(self.seed)
        samples = [(call, row) for call, batch in enumerate(hidden) for row in range(batch.shape[0])]
        zeros.attach()
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    chosen = torch.randperm(len(samples), generator=generator)[: self.batch].tolist()
                    rows_of_call: dict[int, list[int]] = {}
                    for sample in sorted(chosen):
                        call, row = samples[sample]
                        rows_of_call.setdefault(call, []).append(row)
                    optimizer.zero_grad()
                    values = sum(len(rows) * targets[c][0].numel() for c, rows in rows_of_call.items())
                    for c, rows in rows_of_call.items():
                        # Back-propagated call by call, the gradients summing up: autograd holds one call's samples
                        # at a time, not the step's.
                        outputs = calls[c].rows(rows).run(block, hidden[c][rows])
                        (nn.functional.mse_loss(outputs, targets[c][rows], reduction="sum") / values).backward()
                    optimizer.step()
                    zeros.remask()
        finally:
            zeros.detach()
            optimizer.zero_grad(set_to_none=True)  # else each block's gradients stay with its weights to the end
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)


@torch.no_grad()
def mean_magnitude(weight: torch.Tensor) -> float:
    """The mean |w| of a weight's nonzero entries (a pruned weight's zeros say nothing of its scale)."""
    return float(weight.abs().sum() / weight.count_nonzero().clamp(min=1))


def output_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """‖outputs − targets‖² / ‖targets‖² over all calibration samples."""
    error = sum(float((o.double() - t.double()).pow(2).sum()) for o, t in zip(outputs, targets))
    return error / sum(float(t.double().pow(2).sum()) for t in targets)


@torch.no_grad()
def block_outlier_ratios(blocks: nn.ModuleList, block_calls: list[list[BlockCall]], hidden: list[torch.Tensor], device,
                         outlier_factor: float) -> list[float]:
    """OWL's statistic for each block of the dense model: the share of Wanda scores above outlier_factor × their mean."""
    ratios = []
    for block, calls in zip(blocks, block_calls):
        home = next(block.parameters()).device
        block.to(device)
        linears = find_linears(block)
        stats, hidden = block_statistics(block, linears, InputNorms, calls, hidden, device)
        scores = torch.cat([wanda_scores(linear.weight.float(), stats[name]).flatten() for name, linear in linears.items()])
        ratios.append(float((scores > outlier_factor * scores.mean()).float().mean()))
        block.to(home)
    return ratios


@dataclass
class BlockLayout:
    """How every block is pruned (the blocks are identical modules, so the first one's layout holds for all):
    the stages of linear layers pruned together, and the channel permutations that fold exactly."""

    stages: list[list[str]]
    folds: list[Fold]

    @classmethod
    def of(cls, block: nn.Module, linears: dict[str, nn.Linear], first_call: tuple[BlockCall, torch.Tensor] | None,
           block_order: bool, permute: bool) -> BlockLayout:
        """Found by running the block on its first calibration call, in float32 whatever the model's dtype: in
        bfloat16 rounding alone moves a permuted block's outputs past exact_folds' tolerance, and every fold
        would be refused."""
        if first_call is None or not (block_order or permute):
            return cls([list(linears)], [])
        call, hidden = first_call[0].in_float32(), first_call[1].float()
        run_first_call = lambda: call.run(block, hidden)  # noqa: E731
        with _in_float32(block):
            stages = block_stages(linears, run_first_call) if block_order else [list(linears)]
            return cls(stages, exact_folds(block, linears, run_first_call) if permute else [])

    def folds_into(self, stage: list[str]) -> list[Fold]:
        return [fold for fold in self.folds if fold.consumer in stage]


@dataclass(frozen=True)
class PruneOptions:
    """What the engine does around the method's masks, each off by default.

    With `owl`, an unstructured target is spread over the blocks by their outlier ratios (one more
    calibration pass over the dense model first). With `permute`, an N:M target is preceded by the
    input-channel permutations that fold exactly into each block (permute.py). With `block_order`,
    each block is pruned stage by stage on the inputs of its pruned earlier stages; with `refine`,
    each pruned block is fitted to the dense block's outputs.
    """

    owl: Owl | None = None
    permute: bool = False
    block_order: bool = False
    refine: Refine | None = None


@torch.no_grad()
def prune_model(model: nn.Module, batches: list[torch.Tensor], method: Method, structure: Structure,
                options: PruneOptions = PruneOptions(), device: torch.device | str = "cpu", progress: bool = True,
                checkpoint: PruneCheckpoint | None = None) -> PruneRecord:
    """Prune every linear layer of every decoder block of `model` in place (PruneOptions: what else it does).

    With a checkpoint, a prune it holds goes on where it stopped, and new checkpoints are taken between blocks."""
    owl, permute, block_order, refine = options.owl, options.permute, options.block_order, options.refine
    device = torch.device(device)
    check_structure_fits(model, structure)
    if owl is not None:
        owl.check_applies(structure)
    if permute and not structure.is_nm:
        raise WandaServeError(f"channel permutation spreads weights over the groups of an N:M pattern; {structure} is not N:M")
    blocks = find_decoder_blocks(model)
    record, start = PruneRecord(), 0
    needs_calibration = method.statistic is not None or owl is not None or permute or refine is not None
    block_calls, hidden = capture_block_inputs(model, batches, device) if needs_calibration else ([[] for _ in blocks], [])
    release_freed_memory()  # what loading the model and the capture left: else it adds to the first block's peak
    restored = checkpoint.restore(blocks) if checkpoint is not None else None
    if restored is not None:
        record, start = PruneRecord(**restored.record), restored.next_block
        hidden = [h.to(device) for h in restored.hidden]
    if owl is not None and record.block_sparsity is None:  # a resumed prune keeps the sparsities it chose
        with record.timing("forward", device):
            outlier_ratios = block_outlier_ratios(blocks, block_calls, hidden, device, owl.outlier_factor)
        record.block_sparsity = owl.block_sparsities(outlier_ratios, structure.ratio)
    block_structures = [Structure(ratio=ratio) for ratio in record.block_sparsity] if owl else [structure] * len(blocks)
    layout = None

    for index in tqdm(range(start, len(blocks)), initial=start, total=len(blocks), desc="pruning blocks", disable=not progress):
        block, block_structure, calls = blocks[index], block_structures[index], block_calls[index]
        home = next(block.parameters()).device
        block.to(device)
        linears = find_linears(block)
        if layout is None:
            with record.timing("mask", device):
                layout = BlockLayout.of(block, linears, (calls[0], hidden[0]) if calls else None, block_order, permute)
            record.stages = layout.stages if block_order else None
        if refine is not None:
            with record.timing("forward", device):
                dense_outputs = run_block(block, calls, hidden)
        for stage in layout.stages:
            stage_linears = {name: linears[name] for name in stage}
            stats = _stage_statistics(block, stage_linears, method, calls, hidden, device, record, stop=block_order)
            with record.timing("mask", device):
                record.permutations.update(_permute_for_nm(layout.folds_into(stage), linears, stats, method, structure, index))
                _prune_linears(stage_linears, method, stats, block_structure)
        del stats  # a Hessian method's statistics are the largest thing a block holds, and no longer needed
        if refine is None:
            with record.timing("forward", device):
                advance(block, calls, hidden)  # to what the next block sees
        else:
            # Each set of outputs is held only as long as it is needed: the calibration activations are the
            # prune's largest cost after the weights.
            with record.timing("forward", device):
                error_before = output_error(run_block(block, calls, hidden), dense_outputs)
            with record.timing("mask", device):
                unrefined = {name: linear.weight.detach().clone() for name, linear in linears.items()}
                refine(block, linears, calls, hidden, dense_outputs)
            with record.timing("forward", device):
                outputs = run_block(block, calls, hidden)
                error_after = output_error(outputs, dense_outputs)
                kept = error_after <= error_before
                if not kept:
                    # A step size that fits one model can wreck another's block (on Qwen2.5-1.5B, 3e-3 made every
                    # block 10^2-10^4 times worse): refinement never leaves a block worse than the method did.
                    with torch.no_grad():
                        for name, linear in linears.items():
                            linear.weight.copy_(unrefined[name])
                    outputs = run_block(block, calls, hidden)
                hidden = outputs
            record.refined.append({"block": index, "output_error_before": error_before, "output_error_after": error_after,
                                   "kept": kept})
            del dense_outputs, unrefined
        block.to(home)
        release_freed_memory()
        if checkpoint is not None:
            checkpoint.block_done(index, blocks, hidden, record)
    return record


def _stage_statistics(block, linears: dict[str, nn.Linear], method: Method, calls: list[BlockCall], hidden: list[torch.Tensor],
                      device, record: PruneRecord, stop: bool) -> dict:
    """The method's input statistic of each of a stage's layers ({} for methods without one); with `stop`, each
    calibration call runs the block only as far as the stage's last layer."""
    if method.statistic is None:
        return {}
    with record.timing("forward", device):
        stats, _ = block_statistics(block, linears, method.statistic, calls, hidden, device,
                                    stop_after=list(linears)[-1] if stop else None, keep_outputs=False)
    return stats
