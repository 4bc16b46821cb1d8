import pytest
import torch

from conftest import ARCHITECTURES, VOCAB, tiny_model
from wanda_serve.engine import block_linears, find_decoder_blocks, prune_model
from wanda_serve.errors import WandaServeError
from wanda_serve.methods import get_method
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


def test_model_without_decoder_blocks_is_refused():
    with pytest.raises(WandaServeError, match="unsupported architecture Sequential"):
        find_decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
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
    # The engine calls block 1 twice per batch: to collect statistics, then to produce its pruned outputs.
    assert len(inputs_of_block_1) == 2 * len(calibration)
    engine_fed = inputs_of_block_1[: len(calibration)]
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


def test_m_that_does_not_divide_the_width_is_refused_before_pruning():
    model = tiny_model("llama")
    before = block_linears(model)["0.self_attn.q_proj"].weight.detach().clone()
    with pytest.raises(WandaServeError, match="M=7 does not divide its 64 inputs"):
        prune_model(model, batches(), get_method("wanda"), Structure(n=2, m=7), progress=False)
    assert torch.equal(block_linears(model)["0.self_attn.q_proj"].weight, before)
