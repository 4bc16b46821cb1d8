import pytest
import torch

from wanda_serve.methods import (
    METHODS, AlpsConfig, InputHessian, alps_prune, prune_by_scores, sparsegpt_prune, wanda_scores,
)
from wanda_serve.structure import Structure, is_nm_valid, prune_mask

STRUCTURES = [Structure(n=2, m=4), Structure(ratio=0.5)]


def hessian_of(x: torch.Tensor) -> InputHessian:
    stat = InputHessian(x.shape[1], torch.device("cpu"))
    stat.add_batch(x)
    return stat


def correlated_layer(seed: int = 0):
    """32 outputs, 64 inputs, 2048 tokens of correlated inputs X = Z A."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    return torch.randn(32, 64, generator=generator), x


def error(x, weight, pruned) -> float:
    return float((x @ (weight - pruned).T).norm())


def assert_structure(pruned: torch.Tensor, structure: Structure):
    zeros = pruned == 0
    if structure.is_nm:
        assert is_nm_valid(pruned, structure.n, structure.m)
        assert int(zeros.sum()) == pruned.numel() * structure.n // structure.m  # exactly N zeros per group
    else:
        assert torch.equal(zeros.sum(1), torch.full((pruned.shape[0],), int(pruned.shape[1] * structure.ratio)))


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
def test_alps_reconstructs_better_than_sparsegpt_and_wanda(structure):
    weight, x = correlated_layer()
    stat = hessian_of(x)
    alps = alps_prune(weight, stat, structure)
    wanda_mask = prune_mask(wanda_scores(weight, stat), structure)
    assert_structure(alps, structure)
    errors = {
        "alps": error(x, weight, alps),
        "sparsegpt": error(x, weight, sparsegpt_prune(weight, stat, structure)),
        "wanda": error(x, weight, prune_by_scores(wanda_scores)(weight, stat, structure)),
        "wanda mask, refit": error(x, weight, alps_prune(weight, stat, structure, mask=wanda_mask)),
    }
    assert errors["alps"] <= min(errors["sparsegpt"], errors["wanda"])
    # The ADMM's own support against Wanda's (where it starts from), both refit alike: the search must pay.
    assert errors["alps"] < 0.8 * errors["wanda mask, refit"]


def test_alps_is_registered():
    assert METHODS["alps"].statistic is InputHessian and METHODS["alps"].prune is alps_prune
    assert "rho=0.1" in AlpsConfig().describe() and "pcg_steps" in AlpsConfig.__doc__


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
def test_alps_terminates_on_degenerate_layers(structure):
    generator = torch.Generator().manual_seed(1)
    low_rank = torch.randn(512, 3, generator=generator) @ torch.randn(3, 64, generator=generator)
    for weight, x, config in [
        (torch.randn(32, 64, generator=generator), low_rank, AlpsConfig(max_iterations=4)),
        (torch.randn(32, 64, generator=generator), low_rank, AlpsConfig()),
        (torch.ones(32, 64), torch.randn(512, 64, generator=generator), AlpsConfig()),  # ties everywhere
        (torch.zeros(32, 64), torch.randn(512, 64, generator=generator), AlpsConfig()),  # a support that never moves
    ]:
        pruned = alps_prune(weight, hessian_of(x), structure, config)
        assert torch.isfinite(pruned).all()
        if weight.any():
            assert_structure(pruned, structure)


def test_alps_gives_dead_inputs_weight_zero():
    weight, x = correlated_layer()
    x[:, 5] = 0
    pruned = alps_prune(weight, hessian_of(x), Structure(n=2, m=4))
    assert torch.isfinite(pruned).all()
    assert is_nm_valid(pruned, 2, 4)
    assert (pruned[:, 5] == 0).all()


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
def test_alps_with_a_fixed_mask_keeps_it_and_lowers_the_error(structure):
    weight, x = correlated_layer(seed=2)
    mask = prune_mask(weight.abs(), structure)
    refit = alps_prune(weight.to(torch.bfloat16), hessian_of(x), structure, mask=mask)
    assert refit.dtype == torch.bfloat16
    assert torch.equal(refit == 0, mask)
    assert not refit[mask].signbit().any()  # +0.0, not -0.0
    zeroed = weight.masked_fill(mask, 0)
    assert error(x, weight, refit.float()) < 0.9 * error(x, weight, zeroed)
