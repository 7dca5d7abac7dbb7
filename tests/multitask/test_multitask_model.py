import numpy as np
import pytest
import torch

from pharmafl.multitask.model import MultiTaskNet, TrunkModel


def test_parameter_names_and_geometry_round_trip():
    net = MultiTaskNet(n_features=100, n_tasks=7, hidden_sizes=[16, 8], dropout=0.1)
    names = list(net.state_dict())
    assert all(n.startswith(("trunk.", "head.")) for n in names)
    trunk = net.trunk_state()
    server = TrunkModel(100, [16, 8]).state_dict()
    assert set(trunk) == set(server)  # server and client agree on names and shapes
    assert all(trunk[name].shape == tuple(server[name].shape) for name in trunk)


def test_forward_sparse_input_matches_dense_product():
    torch.manual_seed(0)
    net = MultiTaskNet(n_features=50, n_tasks=3, hidden_sizes=[8], dropout=0.0).eval()
    indices = torch.tensor([1, 4, 7, 2, 49])
    offsets = torch.tensor([0, 3])  # row 0: bits 1,4,7; row 1: bits 2,49
    dense = torch.zeros(2, 50)
    dense[0, [1, 4, 7]] = 1
    dense[1, [2, 49]] = 1
    hidden = torch.relu(dense @ net.trunk.input.weight + net.trunk.input_bias)
    expected = net.head(hidden)
    torch.testing.assert_close(net(indices, offsets), expected)


def test_load_trunk_checks_names_and_shapes():
    net = MultiTaskNet(n_features=20, n_tasks=2, hidden_sizes=[4], dropout=0.2)
    weights = {k: np.zeros_like(v) for k, v in net.trunk_state().items()}
    net.load_trunk(weights)
    assert float(net.trunk.input.weight.detach().abs().sum()) == 0.0
    with pytest.raises(ValueError, match="shape"):
        net.load_trunk({**weights, "trunk.input_bias": np.zeros(5, dtype=np.float32)})
    with pytest.raises(ValueError, match="missing"):
        net.load_trunk({"trunk.input_bias": np.zeros(4, dtype=np.float32)})
