import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHITECTURES, CONFIGS, VOCAB, tiny_model
from wanda_serve.engine import (BlockCall, Owl, PruneOptions, Refine, block_linears, block_stages, capture_block_inputs, find_decoder_blocks, find_linears,
                                prune_model)
from wanda_serve.errors import WandaServeError
from wanda_serve.methods import InputNorms, get_method
from wanda_serve.permute import Fold, exact_folds, kept_score, spreading_permutation
from wanda_serve.structure import Structure, audit_linears


def batches(seed=0, count=2, size=(3, 24)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, size, generator=generator) for _ in range(count)]


def test_finds_the_decoder_stack():
    llama, opt = tiny_model("llama"), tiny_model("opt")
    assert find_decoder_blocks(llama) is llama.model.layers
    assert find_decoder_blocks(opt) is opt.model.decoder.layers
    assert sorted(n.split(".", 1)[1] for n in block_linears(llama) if n.startswith("0.")) == [
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_block_is_replayed_with_what_the_model_passes_it(arch):
    # Gemma 3's sliding-window and full-attention layers get different masks and rotary embeddings: the blocks,
    # each run on its own captured call, must compute what the model's own forward pass computes.
    model = tiny_model(arch)
    ids = batches()[0]
    block_calls, (hidden,) = capture_block_inputs(model, [ids], torch.device("cpu"))
    blocks = find_decoder_blocks(model)
    expected = model(input_ids=ids, output_hidden_states=True).hidden_states  # the embeddings, then each block's output
    for index, (block, (call,)) in enumerate(list(zip(blocks, block_calls))[:-1]):  # the last one's comes normalised
        hidden = call.run(block, hidden)
        assert torch.allclose(hidden, expected[index + 1], atol=1e-5), (arch, index)


def test_model_without_decoder_blocks_is_refused():
    with pytest.raises(WandaServeError, match="unsupported architecture Sequential"):
        find_decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria", "sparsegpt"])
def test_prunes_every_block_linear_to_2_of_4_and_nothing_else(arch, method):
    model = tiny_model(arch)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    linear_weights = {id(l.weight) for l in block_linears(model).values()}
    prune_model(model, batches(), get_method(method), Structure(n=2, m=4), progress=False)

    audit = audit_linears(block_linears(model))
    assert audit["all_nm_valid"]["2:4"]
    assert all(layer["sparsity"] == 0.5 for layer in audit["layers"].values())
    for name, param in model.named_parameters():
        if id(param) not in linear_weights:  # embeddings, norms, biases, lm_head
            assert torch.equal(param, before[name]), name
    logits = model(batches()[0]).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_unstructured_ratio_is_exact_per_row(arch):
    model = tiny_model(arch)
    prune_model(model, batches(), get_method("wanda"), Structure(ratio=0.3), progress=False)
    for linear in block_linears(model).values():
        zeros_per_row = (linear.weight == 0).sum(1)
        assert (zeros_per_row == int(linear.in_features * 0.3)).all()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_next_block_sees_the_pruned_outputs(arch):
    model = tiny_model(arch)
    calibration = batches()
    inputs_of_block_1 = []
    handle = find_decoder_blocks(model)[1].register_forward_pre_hook(
        lambda mod, args, kwargs: inputs_of_block_1.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True,
    )

    def run_model():
        inputs_of_block_1.clear()
        with torch.no_grad():
            for ids in calibration:
                model(ids)
        return list(inputs_of_block_1)

    dense = run_model()
    inputs_of_block_1.clear()
    prune_model(model, calibration, get_method("wanda"), Structure(n=2, m=4), progress=False)
    # Per batch, the capture passes the embeddings through block 1 (as the identity); then the engine calls it twice:
    # to collect statistics, then to produce its pruned outputs.
    assert len(inputs_of_block_1) == 3 * len(calibration)
    engine_fed = inputs_of_block_1[len(calibration): 2 * len(calibration)]
    pruned = run_model()
    handle.remove()
    for fed, pruned_input, dense_input in zip(engine_fed, pruned, dense):
        assert torch.allclose(fed, pruned_input, atol=1e-5)
        assert not torch.allclose(fed, dense_input, atol=1e-3)


def test_same_inputs_give_identical_masks():
    masks = []
    for _ in range(2):
        model = tiny_model("qwen2")
        prune_model(model, batches(), get_method("wanda"), Structure(n=2, m=4), progress=False)
        masks.append([l.weight == 0 for l in block_linears(model).values()])
    assert all(torch.equal(a, b) for a, b in zip(*masks))


def test_freed_memory_is_handed_back_after_the_capture_and_each_block(monkeypatch):
    import wanda_serve.engine as engine
    assert engine._malloc_trim() is not None  # glibc, as on every machine this project supports
    trims = []
    monkeypatch.setattr(engine, "_malloc_trim", lambda: trims.append)
    model = tiny_model("qwen2")
    prune_model(model, batches(), get_method("wanda"), Structure(n=2, m=4), progress=False)
    assert trims == [0] * (1 + len(find_decoder_blocks(model)))  # after the capture, then after each block


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_activations_are_held_once(method):
    """The statistics pass (its outputs are never read) and the pass to the next block's inputs each hold one set
    of activations, the block's inputs turning into its outputs, not a second set beside the first: on a large
    model each set is hundreds of MB."""
    model = tiny_model("llama")
    calibration = batches(count=4)
    alive, most_alive = {}, []  # id -> weakref of each block input and output seen; the most alive at a block call

    def before(block, args, kwargs):
        alive[id(args[0])] = weakref.ref(args[0])
        most_alive.append(sum(ref() is not None for ref in alive.values()))

    def after(block, args, kwargs, output):
        output = output[0] if isinstance(output, tuple) else output
        alive[id(output)] = weakref.ref(output)

    for block in find_decoder_blocks(model):
        block.register_forward_pre_hook(before, with_kwargs=True)
        block.register_forward_hook(after, with_kwargs=True)
    prune_model(model, calibration, get_method(method), Structure(n=2, m=4), PruneOptions(permute=False), progress=False)
    assert max(most_alive) == len(calibration)


def test_m_that_does_not_divide_the_width_is_refused_before_pruning():
    model = tiny_model("llama")
    before = block_linears(model)["0.self_attn.q_proj"].weight.detach().clone()
    with pytest.raises(WandaServeError, match="M=7 does not divide its 64 inputs"):
        prune_model(model, batches(), get_method("wanda"), Structure(n=2, m=7), progress=False)
    assert torch.equal(block_linears(model)["0.self_attn.q_proj"].weight, before)


def test_owl_spreads_the_ratio_over_blocks_and_keeps_the_global_ratio():
    owl = Owl(spread=0.1)
    assert owl.block_sparsities([0.01, 0.03, 0.02], 0.5) == pytest.approx([0.6, 0.4, 0.5])  # more outliers, fewer zeros
    assert owl.block_sparsities([0.02, 0.02], 0.5) == [0.5, 0.5]

    model = tiny_model("llama")
    record = prune_model(model, batches(), get_method("wanda"), Structure(ratio=0.5), options=PruneOptions(owl=owl), progress=False)
    assert sorted(record.block_sparsity) == pytest.approx([0.4, 0.6])  # two blocks: target ± spread
    audit = audit_linears(block_linears(model))
    assert audit["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    for name, layer in audit["layers"].items():
        assert layer["sparsity"] == pytest.approx(record.block_sparsity[int(name.split(".")[0])], abs=0.02)


def test_owl_refuses_n_m():
    with pytest.raises(WandaServeError, match="OWL spreads an unstructured ratio"):
        prune_model(tiny_model("llama"), batches(), get_method("wanda"), Structure(n=2, m=4), options=PruneOptions(owl=Owl()), progress=False)


@pytest.mark.parametrize("arch, fold", [
    ("llama", Fold(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")),
    ("opt", Fold(("fc1",), "fc2")),
])
def test_only_exact_folds_are_found_and_a_folded_permutation_keeps_the_logits(arch, fold):
    model = tiny_model(arch)
    ids = batches()[0]
    before = model(ids).logits
    block_calls, (hidden,) = capture_block_inputs(model, [ids], torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    for block, (call,) in zip(find_decoder_blocks(model), block_calls):
        linears = find_linears(block)
        assert exact_folds(block, linears, lambda: call.run(block, hidden)) == [fold]
        fold.apply(linears, torch.randperm(linears[fold.consumer].in_features, generator=generator))
    assert torch.allclose(model(ids).logits, before, atol=1e-5)


def test_spreading_permutation_keeps_more_score_under_2_of_4():
    scores = torch.rand(8, 16) + torch.tensor([10.0] * 4 + [0.0] * 12)  # the four strong inputs share one group
    structure = Structure(n=2, m=4)
    perm = spreading_permutation(scores, structure)
    assert sorted(perm.tolist()) == list(range(16))
    assert kept_score(scores[:, perm], structure) > kept_score(scores, structure) + 8 * 2 * 9
    uniform = torch.ones(4, 8)
    assert torch.equal(spreading_permutation(uniform, structure), torch.arange(8))  # nothing to gain: unchanged


def test_a_gain_within_rounding_noise_keeps_the_identity():
    structure = Structure(n=2, m=4)
    scores = torch.ones(4, 8, dtype=torch.float64)
    scores[:, :3] += 1e-8  # three strongest in one group, one of them pruned: spreading gains 2.5e-9 of the score
    assert torch.equal(spreading_permutation(scores, structure), torch.arange(8))
    scores[:, :3] += 1e-3  # a gain well above another machine's rounding: taken
    assert not torch.equal(spreading_permutation(scores, structure), torch.arange(8))


def test_kept_score_is_summed_in_float64():
    scores = torch.tensor([[1e8, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]])  # float32 cannot hold 1e8 + 3
    assert kept_score(scores, Structure(n=2, m=4)) == 100_000_003


def test_permuted_pruning_is_n_m_valid_and_keeps_more_than_unpermuted():
    plain, permuted = tiny_model("llama"), tiny_model("llama")
    prune_model(plain, batches(), get_method("wanda"), Structure(n=2, m=4), progress=False)
    record = prune_model(permuted, batches(), get_method("wanda"), Structure(n=2, m=4), options=PruneOptions(permute=True), progress=False)
    assert set(record.permutations) == {"0.mlp.down_proj", "1.mlp.down_proj"}
    assert all(p["kept_score_ratio"] >= 1 for p in record.permutations.values())
    assert audit_linears(block_linears(permuted))["all_nm_valid"]["2:4"]
    with pytest.raises(WandaServeError, match="not N:M"):
        prune_model(tiny_model("llama"), batches(), get_method("wanda"), Structure(ratio=0.5), options=PruneOptions(permute=True), progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_permuted_like_a_float32_one_and_stays_in_its_dtype(dtype):
    # In bfloat16 rounding alone moves a permuted block's outputs past the exactness tolerance, so the folds are
    # checked in float32: before that, a bfloat16 prune silently kept no permutation at all. This model is the
    # tiny one widened until that happened (the 64-wide one rounds the same either way).
    config = CONFIGS["llama"]()
    config.hidden_size, config.intermediate_size = 256, 512
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().to(dtype)
    record = prune_model(model, batches(), get_method("wanda"), Structure(n=2, m=4), options=PruneOptions(permute=True), progress=False)
    assert set(record.permutations) == {"0.mlp.down_proj", "1.mlp.down_proj"}
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert audit_linears(block_linears(model))["all_nm_valid"]["2:4"]


class TwoLayers(torch.nn.Module):
    def __init__(self, between: torch.nn.Module):
        super().__init__()
        self.up, self.between, self.down = torch.nn.Linear(8, 16), between, torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(self.between(self.up(x)))


def test_a_fold_is_kept_only_if_it_leaves_the_output_unchanged():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    elementwise = TwoLayers(torch.nn.GELU())
    assert exact_folds(elementwise, find_linears(elementwise), lambda: elementwise(x)) == [Fold(("up",), "down")]
    norm = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(norm.weight)  # a per-channel affine that the permutation does not move
    mixing = TwoLayers(norm)
    before = mixing(x)
    assert exact_folds(mixing, find_linears(mixing), lambda: mixing(x)) == []
    assert torch.equal(mixing(x), before)  # the trial permutation was undone


def test_block_stages_follow_the_forward_pass():
    for arch, expected in [("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
                           ("opt", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"],
                                    ["fc1"], ["fc2"]])]:
        model = tiny_model(arch)
        block_calls, hidden = capture_block_inputs(model, batches()[:1], torch.device("cpu"))
        block = find_decoder_blocks(model)[0]
        stages = block_stages(find_linears(block), lambda: block_calls[0][0].run(block, hidden[0]))
        assert [sorted(stage) for stage in stages] == [sorted(stage) for stage in expected], arch


def test_block_order_computes_o_proj_statistic_through_the_pruned_attention():
    structure, method = Structure(n=2, m=4), get_method("wanda")
    staged, one_pass = tiny_model("llama"), tiny_model("llama")
    prune_model(staged, batches(), method, structure, options=PruneOptions(block_order=True), progress=False)
    prune_model(one_pass, batches(), method, structure, progress=False)
    first = lambda model, name: find_linears(find_decoder_blocks(model)[0])[name].weight  # noqa: E731
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):  # the first stage sees the block's inputs either way
        assert torch.equal(first(staged, name), first(one_pass, name))
    assert not torch.equal(first(staged, "self_attn.o_proj"), first(one_pass, "self_attn.o_proj"))

    # By hand: prune q/k/v of the first block, rerun it, and take o_proj's Wanda mask from the inputs it now sees.
    model = tiny_model("llama")
    (calls, *_), hidden = capture_block_inputs(model, batches(), torch.device("cpu"))
    block = find_decoder_blocks(model)[0]
    linears = find_linears(block)
    norms = {name: InputNorms(linears[name].in_features, torch.device("cpu")) for name in linears}
    hooks = [linears[n].register_forward_hook(lambda m, i, o, n=n: norms[n].add_batch(i[0])) for n in linears]
    with torch.no_grad():
        for call, h in zip(calls, hidden):
            call.run(block, h)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            linears[name].weight.data = method.prune(linears[name].weight.data, norms[name], structure)
        norms["self_attn.o_proj"] = InputNorms(linears["self_attn.o_proj"].in_features, torch.device("cpu"))
        for call, h in zip(calls, hidden):
            call.run(block, h)
    for hook in hooks:
        hook.remove()
    expected = method.prune(linears["self_attn.o_proj"].weight.data, norms["self_attn.o_proj"], structure)
    assert torch.equal(first(staged, "self_attn.o_proj"), expected)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_refinement_lowers_each_blocks_output_error_and_keeps_every_zero(method):
    structure = Structure(n=2, m=4)
    plain, refined = tiny_model("llama"), tiny_model("llama")
    prune_model(plain, batches(count=4), get_method(method), structure, progress=False)
    record = prune_model(refined, batches(count=4), get_method(method), structure,
                         options=PruneOptions(refine=Refine(steps=20, batch=2)), progress=False)
    assert len(record.refined) == 2
    for block in record.refined:
        assert block["output_error_after"] < block["output_error_before"] and block["kept"], block
    audit = audit_linears(block_linears(refined))
    assert audit["all_nm_valid"]["2:4"] and all(layer["sparsity"] >= 0.5 for layer in audit["layers"].values())
    for name, linear in find_linears(find_decoder_blocks(refined)[0]).items():  # block 0 saw the same inputs in both runs
        zeros = find_linears(find_decoder_blocks(plain)[0])[name].weight == 0
        assert (linear.weight[zeros] == 0).all(), name
        assert not torch.equal(linear.weight, find_linears(find_decoder_blocks(plain)[0])[name].weight), name
    # Nothing of the training stays with the model: a block's gradients held to the end grow memory by a block per block.
    assert all(p.grad is None for p in refined.parameters())
    assert [p.requires_grad for p in refined.parameters()] == [p.requires_grad for p in plain.parameters()]


def test_refinement_that_leaves_a_block_worse_is_undone():
    # A step size far too large for the model: every block's output error grows, so every block keeps the
    # method's weights and the model is the plain prune's, bit for bit.
    structure = Structure(n=2, m=4)
    plain, refined = tiny_model("llama"), tiny_model("llama")
    prune_model(plain, batches(count=4), get_method("sparsegpt"), structure, progress=False)
    record = prune_model(refined, batches(count=4), get_method("sparsegpt"), structure,
                         options=PruneOptions(refine=Refine(steps=5, lr=10.0, batch=2)), progress=False)
    for block in record.refined:
        assert block["output_error_after"] > block["output_error_before"] and not block["kept"], block
    for name, weight in refined.state_dict().items():
        assert torch.equal(weight, plain.state_dict()[name]), name


def test_refinement_steps_are_relative_to_the_weights_scale():
    """Adam moves every weight by about lr per step whatever its size: an absolute lr right for SmolLM2's weights
    (mean |w| ~0.15) wrecked Qwen2.5-Coder-1.5B's (~0.01). Refining a layer scaled by 0.01 toward targets scaled
    alike must give the same weights scaled alike."""
    torch.manual_seed(0)
    weight, dense = torch.randn(16, 16), torch.randn(16, 16)
    weight[:, ::2] = 0
    hidden = [torch.randn(4, 8, 16)]
    refined = {}
    for scale in (1.0, 0.01):
        layer = torch.nn.Linear(16, 16, bias=False)
        layer.weight.data = weight * scale
        Refine(steps=5, lr=0.02, batch=4)(layer, {"layer": layer}, [BlockCall(4, (), {})], hidden, [hidden[0] @ (dense * scale).T])
        refined[scale] = layer.weight.detach()
    assert not torch.allclose(refined[1.0], weight)
    assert torch.allclose(refined[0.01] / 0.01, refined[1.0], rtol=1e-4, atol=1e-6)


def test_refinement_steps_on_batch_samples_however_the_calibration_was_grouped():
    samples = batches(count=1, size=(12, 24))[0]
    grouped = {"4 calls of 3": list(samples.split(3)), "12 calls of 1": list(samples.split(1))}
    results, rows_per_step = {}, {}
    for name, calibration in grouped.items():
        model = tiny_model("opt")  # OPT's position ids carry the batch dimension, so they must be cut with the samples
        block = find_decoder_blocks(model)[0]
        (calls, *_), hidden = capture_block_inputs(model, calibration, torch.device("cpu"))
        with torch.no_grad():
            targets = [call.run(block, h) for call, h in zip(calls, hidden)]
        linears = find_linears(block)
        for linear in linears.values():
            linear.weight.data[:, ::4] = 0  # some zeros to keep
        seen = []
        hook = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]) if torch.is_grad_enabled() else None)
        Refine(steps=3, batch=5)(block, linears, calls, hidden, targets)
        hook.remove()
        rows_per_step[name] = seen
        results[name] = {n: linear.weight.detach().clone() for n, linear in linears.items()}
    assert sum(rows_per_step["4 calls of 3"]) == sum(rows_per_step["12 calls of 1"]) == 3 * 5
    for name, weight in results["4 calls of 3"].items():
        assert torch.allclose(weight, results["12 calls of 1"][name], atol=1e-6), name
        assert (weight[:, ::4] == 0).all()
