import pytest
import torch

from conftest import peak_memory_above_start

from wanda_serve.errors import WandaServeError
from wanda_serve.methods import (
    METHODS, InputHessian, InputNorms, get_method, magnitude_scores, ria_scores, upper_cholesky_of_inverse_, wanda_scores,
)
from wanda_serve.structure import Structure, is_nm_valid


def collect(statistic, layer: torch.nn.Linear, batches: list[torch.Tensor]):
    """Feed batches through `layer` with a forward hook, as the engine does."""
    stat = statistic(layer.in_features, torch.device("cpu"))
    handle = layer.register_forward_hook(lambda mod, inp, out: stat.add_batch(inp[0]))
    with torch.no_grad():
        for batch in batches:
            layer(batch)
    handle.remove()
    return stat


def test_wanda_score_is_weight_magnitude_times_input_norm():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4, bias=False)
    batches = [torch.randn(2, 5, 6), torch.randn(3, 7, 6)]  # (B, T, in)
    stat = collect(InputNorms, layer, batches)
    tokens = torch.cat([b.reshape(-1, 6) for b in batches]).double()  # every token, (41, 6)
    by_hand = torch.empty(4, 6, dtype=torch.float64)
    for i in range(4):
        for j in range(6):
            by_hand[i, j] = layer.weight[i, j].abs() * torch.sqrt(sum(t[j] ** 2 for t in tokens))
    # float64 throughout: a float32 sum over the tokens would miss this tolerance by orders of magnitude.
    assert torch.allclose(wanda_scores(layer.weight.detach(), stat), by_hand, rtol=1e-12, atol=0)
    assert torch.equal(magnitude_scores(layer.weight.detach(), None), layer.weight.detach().abs())


def test_hessian_is_twice_mean_outer_product():
    layer = torch.nn.Linear(3, 2)
    x = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]])
    stat = collect(InputHessian, layer, [x])
    expected = 2 * (torch.outer(x[0, 0], x[0, 0]) + torch.outer(x[0, 1], x[0, 1])) / 2
    assert torch.allclose(stat.hessian, expected)


def test_hessian_is_a_new_tensor_equal_to_the_formula_to_the_bit():
    stat = InputHessian(5, torch.device("cpu"))
    stat.add_batch(torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0)))
    hessian = stat.hessian
    assert torch.equal(hessian, 2 * stat.xxt / stat.tokens)
    hessian.add_(1)  # sparsegpt damps and factorizes it in place
    assert torch.equal(stat.hessian, 2 * stat.xxt / stat.tokens)


@pytest.mark.parametrize("size", [7, 1030, 2100])  # one strip of the in-place transpose, a strip and a bit, and three
def test_in_place_inverse_factor_is_the_reference_chain_to_the_bit(size):
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(2 * size, size, generator=generator) * torch.rand(size, generator=generator)
    H = x.T @ x
    H += 1e-3 * torch.randn(size, size, generator=generator)  # its triangles differ: the factorization reads the lower one
    H.diagonal().add_(0.01 * float(H.diagonal().mean()))
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    memory = H.data_ptr()
    factor = upper_cholesky_of_inverse_(H)
    assert factor.data_ptr() == memory  # written into H, not a copy
    assert factor.stride() == reference.stride()  # the layout decides the rounding of the products SparseGPT takes with it
    assert torch.equal(factor, reference)


# One SparseGPT call on a wide layer in a fresh process, after a small one has loaded LAPACK's kernels.
SPARSEGPT_ON_A_WIDE_LAYER = """
    import torch
    from wanda_serve.methods import InputHessian, sparsegpt_prune
    from wanda_serve.structure import Structure

    def layer(width, rows):
        generator = torch.Generator().manual_seed(width)
        stat = InputHessian(width, torch.device("cpu"))
        stat.add_batch(torch.randn(2 * width, width, generator=generator))
        return torch.randn(rows, width, generator=generator), stat

    sparsegpt_prune(*layer(256, 16), Structure.parse("2:4"))
    weight, stat = layer(int(sys.argv[1]), int(sys.argv[2]))
    start_peak()
    sparsegpt_prune(weight, stat, Structure.parse("2:4"))
    report_peak()
"""


def test_sparsegpt_holds_one_hessian_beside_its_statistic():
    width, rows = 4096, 256
    hessian_bytes = width * width * 4
    above = peak_memory_above_start(SPARSEGPT_ON_A_WIDE_LAYER, str(width), str(rows))
    # The Hessian, damped and factorized in place, with the weight's working copy, one update product and one strip
    # of the in-place transpose: 1.37x here. Copying the Hessian, damping it with an identity matrix and keeping
    # each Cholesky factor until the next was made: 3.16x.
    assert above < 1.6 * hessian_bytes, f"peaked {above / hessian_bytes:.2f}x the Hessian ({above / 2**20:.0f} MiB)"


def toy_layer_and_inputs():
    """A layer whose inputs have correlated channels with very different scales, as LLM activations do."""
    generator = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(64, 32, bias=False)
    layer.weight.data = torch.randn(32, 64, generator=generator)
    mixing = torch.randn(64, 64, generator=generator) * 0.3 + torch.eye(64)
    scales = torch.ones(64)
    scales[::9] = 20.0  # outlier channels
    inputs = [(torch.randn(4, 64, 64, generator=generator) @ mixing) * scales for _ in range(4)]  # (B, T, in)
    return layer, inputs


def reconstruction_error(layer, pruned_weight, inputs) -> float:
    x = torch.cat([b.reshape(-1, b.shape[-1]) for b in inputs])
    return float(((x @ layer.weight.detach().T - x @ pruned_weight.T) ** 2).sum())


@pytest.mark.parametrize("structure", ["2:4", "4:8", "0.5"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda_beats_magnitude(structure):
    structure = Structure.parse(structure)
    layer, inputs = toy_layer_and_inputs()
    errors = {}
    for name, method in METHODS.items():
        stat = collect(method.statistic, layer, inputs) if method.statistic else None
        pruned = method.prune(layer.weight.detach(), stat, structure)
        assert pruned.shape == layer.weight.shape
        if structure.is_nm:
            assert is_nm_valid(pruned, structure.n, structure.m)
            assert int((pruned == 0).sum()) == pruned.numel() * structure.n // structure.m
        else:
            assert abs(float((pruned == 0).float().mean()) - 0.5) < 1e-6
        errors[name] = reconstruction_error(layer, pruned, inputs)
    assert errors["sparsegpt"] < errors["magnitude"]
    assert errors["wanda"] < errors["magnitude"]


def test_scoring_methods_zero_exactly_the_mask_and_keep_the_rest():
    layer, inputs = toy_layer_and_inputs()
    stat = collect(InputNorms, layer, inputs)
    weight = layer.weight.detach()
    pruned = METHODS["wanda"].prune(weight, stat, Structure(n=2, m=4))
    kept = pruned != 0
    assert torch.equal(pruned[kept], weight[kept])
    assert int(kept.sum()) == weight.numel() // 2


def test_ria_score_by_hand():
    weight = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    stat = InputNorms(2, torch.device("cpu"))
    stat.add_batch(torch.tensor([[2.0, 3.0]]))  # squared norms 4 and 9: ||X|| = 2 and 3
    # |W| over its row sum (3, 7) plus |W| over its column sum (4, 6), times ||X||^0.5
    by_hand = torch.tensor([[(1 / 3 + 1 / 4) * 2 ** 0.5, (2 / 3 + 2 / 6) * 3 ** 0.5],
                            [(3 / 7 + 3 / 4) * 2 ** 0.5, (4 / 7 + 4 / 6) * 3 ** 0.5]], dtype=torch.float64)
    assert torch.allclose(ria_scores(weight, stat), by_hand, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["wanda", "ria"])
@pytest.mark.parametrize("structure", [Structure(n=2, m=4), Structure(ratio=0.5)])
def test_reconstruction_keeps_the_mask_and_lowers_the_output_error(method, structure):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 16, bias=False)
    mixing = torch.randn(16, 64)  # inputs near a 16-dimensional subspace: correlated, as real activations are
    batches = [torch.randn(4, 32, 16) @ mixing + 0.1 * torch.randn(4, 32, 64) for _ in range(4)]
    weight = layer.weight.detach()
    plain = get_method(method).prune(weight, collect(get_method(method).statistic, layer, batches), structure)
    reconstructed = get_method(method, reconstruct=True).prune(weight, collect(InputHessian, layer, batches), structure)
    assert torch.equal(plain == 0, reconstructed == 0)  # the same weights pruned
    assert not torch.equal(plain, reconstructed)  # the survivors moved
    x = torch.cat([b.reshape(-1, 64) for b in batches])
    error = lambda w: (x @ w.T - x @ weight.T).pow(2).sum()  # noqa: E731
    assert error(reconstructed) < 0.8 * error(plain)


def test_reconstruction_is_for_scoring_methods_only():
    with pytest.raises(WandaServeError, match="sparsegpt already updates the weights it keeps"):
        get_method("sparsegpt", reconstruct=True)
