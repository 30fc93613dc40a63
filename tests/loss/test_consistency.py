import math

import torch

from mosa_scale.loss import HiddenCapture, consistency_loss, symmetric_kl


def test_symmetric_kl_value():
    l1 = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    l2 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    p1, p2 = l1.softmax(-1), l2.softmax(-1)
    kl = lambda p, q: (p * (p / q).log()).sum(-1).mean()  # KL(p || q), batch mean
    expected = 0.5 * (kl(p2, p1) + kl(p1, p2))
    assert math.isclose(symmetric_kl(l1, l2).item(), expected.item(), rel_tol=1e-6)
    assert symmetric_kl(l1, l1).item() == 0.0


def test_each_pass_is_pulled_towards_a_fixed_other():
    l1 = torch.randn(4, 5, requires_grad=True)
    l2 = torch.randn(4, 5, requires_grad=True)
    symmetric_kl(l1, l2).backward()
    # d/dl1 of KL(sg(p2)||p1)/2 = (p1 - p2)/2/B; the other direction is stopped for l1's target
    expected = (l1.softmax(-1) - l2.softmax(-1)).detach() / 2 / 4
    torch.testing.assert_close(l1.grad, expected, rtol=1e-5, atol=1e-7)


def test_terms_and_switches():
    l1, l2 = torch.randn(3, 4), torch.randn(3, 4)
    y = torch.tensor([0, 1, 2])
    h1, h2 = [torch.ones(3, 2)], [torch.zeros(3, 2)]
    out = consistency_loss(l1, l2, y, weight=2.0, hidden1=h1, hidden2=h2, hidden_weight=0.01, second_ce=True)
    ce2 = torch.nn.functional.cross_entropy(l2, y)
    assert math.isclose(out["hidden_mse"].item(), 1.0)
    assert math.isclose(out["total"].item(), 2.0 * out["kl"].item() + 0.01 + ce2.item(), rel_tol=1e-6)
    off = consistency_loss(l1, l2)
    assert off["hidden_mse"].item() == 0.0 and off["ce2"].item() == 0.0


def test_hidden_capture_records_module_outputs():
    lin = torch.nn.Linear(2, 2)
    cap = HiddenCapture([lin])
    x = torch.randn(1, 2)
    lin(x)
    lin(x)
    got = cap.take()
    assert len(got) == 2 and cap.take() == []
    assert torch.equal(got[0], torch.nn.functional.linear(x, lin.weight, lin.bias))
    cap.remove()
    lin(x)
    assert cap.take() == []
