import subprocess
import sys

import pytest
import torch

from mosa_scale.sparse.partition import partition


@pytest.mark.parametrize("n", [2, 3, 4, 7])
@pytest.mark.parametrize("shape", [(8, 32), (32, 8), (5, 13)])
def test_all_mode_disjoint_covering_balanced(shape, n):
    a = partition(shape, n, seed=3407, name="blocks.0.up.weight", mode="all")
    assert a.dtype == torch.int8 and a.shape == shape
    sizes = torch.bincount(a.reshape(-1).long(), minlength=n)
    assert int(sizes.sum()) == shape[0] * shape[1]  # covering; one label per entry = disjoint
    assert int(sizes.min()) >= 1 and int(sizes.max() - sizes.min()) <= 1


@pytest.mark.parametrize("n", [2, 4])
def test_row_and_column_modes_balance_within_rows_and_columns(n):
    a = partition((8, 12), n, seed=1, name="w", mode="row")
    for row in a:
        s = torch.bincount(row.long(), minlength=n)
        assert int(s.max() - s.min()) <= 1
    c = partition((12, 8), n, seed=1, name="w", mode="column")
    for col in c.t():
        s = torch.bincount(col.long(), minlength=n)
        assert int(s.max() - s.min()) <= 1


def test_depends_only_on_seed_and_name():
    a = partition((16, 16), 4, seed=7, name="x.weight")
    torch.manual_seed(123)  # global RNG state must not matter
    torch.rand(100)
    b = partition((16, 16), 4, seed=7, name="x.weight")
    assert torch.equal(a, b)
    assert not torch.equal(a, partition((16, 16), 4, seed=8, name="x.weight"))
    assert not torch.equal(a, partition((16, 16), 4, seed=7, name="y.weight"))


def test_identical_across_processes():
    code = (
        "import torch; from mosa_scale.sparse.partition import partition; "
        "print(partition((16, 16), 4, seed=7, name='x.weight', mode='row').reshape(-1).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = partition((16, 16), 4, seed=7, name="x.weight", mode="row").reshape(-1).tolist()
    assert eval(out.strip().splitlines()[-1]) == here


def test_too_many_experts_names_the_parameter():
    with pytest.raises(ValueError, match="num_experts.*'tiny'.*only 3 entries"):
        partition((2, 3), 4, seed=0, name="tiny", mode="row")
    with pytest.raises(ValueError, match="mode.*allowed values"):
        partition((2, 3), 2, seed=0, name="tiny", mode="diagonal")
