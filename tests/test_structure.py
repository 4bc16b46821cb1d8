import pytest
import torch

from wanda_serve.errors import WandaServeError
from wanda_serve.structure import Structure, audit_linears, is_nm_valid, prune_mask


@pytest.mark.parametrize("text, expected", [("2:4", Structure(n=2, m=4)), ("4:8", Structure(n=4, m=8)),
                                            ("1:3", Structure(n=1, m=3)), ("0.5", Structure(ratio=0.5)),
                                            ("70%", Structure(ratio=0.7))])
def test_parse(text, expected):
    assert Structure.parse(text) == expected


@pytest.mark.parametrize("text, message", [
    ("4:4", "invalid N:M 4:4: need 0 < N < M"), ("5:4", "invalid N:M 5:4"), ("0:4", "invalid N:M 0:4"),
    ("0", "sparsity ratio must be in (0, 1), got 0.0"), ("1", "got 1.0"), ("1.5", "got 1.5"), ("-0.2", "got -0.2"),
    ("two:four", "invalid structure 'two:four'"),
])
def test_parse_rejects(text, message):
    with pytest.raises(WandaServeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Structure.parse(text)


def test_width_must_be_divisible_by_m():
    with pytest.raises(WandaServeError, match="M=8 does not divide its 12 inputs"):
        Structure.parse("4:8").check_width(12, "0.mlp.up_proj")


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_prunes_exactly_n_per_group(n, m):
    scores = torch.rand(16, 32)
    mask = prune_mask(scores, Structure(n=n, m=m))
    assert (mask.reshape(16, 32 // m, m).sum(-1) == n).all()
    # The pruned ones are the lowest of their group.
    groups, pruned = scores.reshape(16, -1, m), mask.reshape(16, -1, m)
    assert (groups.masked_fill(~pruned, -1).amax(-1) <= groups.masked_fill(pruned, 2).amin(-1)).all()


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.9])
def test_unstructured_mask_prunes_exact_ratio_per_row(ratio):
    scores = torch.rand(8, 50)
    mask = prune_mask(scores, Structure(ratio=ratio))
    assert (mask.sum(1) == int(50 * ratio)).all()
    assert (scores.masked_fill(~mask, -1).amax(1) <= scores.masked_fill(mask, 2).amin(1)).all()


def test_ties_prune_the_lower_column_first():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 3.0]])
    assert prune_mask(scores, Structure(n=2, m=4)).tolist() == [[True, True, False, False, False, True, True, False]]
    assert prune_mask(scores, Structure(ratio=0.5)).tolist() == [[True, True, True, True, False, False, False, False]]


def test_nm_validity_counts_at_least_n_zeros():
    weight = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]])
    assert is_nm_valid(weight, 2, 4)
    assert not is_nm_valid(weight, 3, 4)
    assert not is_nm_valid(weight, 2, 3)  # 3 does not divide 8
    assert not is_nm_valid(torch.ones(2, 8), 2, 4)


def test_audit_reports_each_layer():
    dense, sparse = torch.nn.Linear(8, 2), torch.nn.Linear(8, 2)
    sparse.weight.data[:, ::2] = 0
    audit = audit_linears({"dense": dense, "sparse": sparse}, Structure(n=1, m=2))
    assert audit["layers"]["sparse"] == {"shape": [2, 8], "sparsity": 0.5, "nm_valid": {"1:2": True, "2:4": True, "4:8": True}}
    assert audit["layers"]["dense"]["sparsity"] == 0.0
    assert audit["overall_sparsity"] == 0.25
    assert audit["all_nm_valid"] == {"1:2": False, "2:4": False, "4:8": False}
