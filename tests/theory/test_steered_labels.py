"""SteeredModel's label embedding in 'module' mode (added to a named submodule's output through a hook):
equal to the pre-trained model at initialisation and for the NULL label, a working gradient path, clear
errors, and copies that carry their own hook."""
import copy

import pytest
import torch

from theory.engine import SteeredModel
from theory.nets import EpsMLP


def _pair(seed=0):
    torch.manual_seed(seed)
    base = EpsMLP(3, hidden=16, depth=2, time_dim=8)
    return base, SteeredModel(copy.deepcopy(base), lora_rank=2, n_labels=4, label_mode="module",
                              label_module="time", label_shape=(8,))


def test_module_mode_init_null_and_reference():
    base, m = _pair()
    x, t = torch.randn(6, 3), torch.rand(6)
    c = torch.tensor([0, 1, 2, 3, -1, 2])
    with torch.no_grad():
        assert torch.equal(m(x, t, c), base(x, t))  # bit for bit at initialisation
        m.embeddings[0].normal_()
        out = m(x, t, c)
        assert torch.equal(out[4], base(x, t)[4])  # NULL label reads the zero buffer
        assert bool(((out - base(x, t)).abs().sum(1)[[0, 1, 2, 3, 5]] > 0).all())
        assert torch.equal(m.reference(x, t, c), base(x, t))
        # the embedding enters through the time features, so the correction depends on x and t
        same_c = torch.zeros(6, dtype=torch.long)
        d = m(x, t, same_c) - base(x, t)
        assert not torch.allclose(d, d[:1].expand_as(d))


def test_module_mode_gradient_reaches_embedding_and_copy_is_independent():
    base, m = _pair(1)
    x, t, c = torch.randn(5, 3), torch.rand(5), torch.tensor([0, 1, 1, -1, 3])
    m(x, t, c).pow(2).sum().backward()
    g = m.embeddings[0].grad
    assert g is not None and bool((g[[0, 1, 3]].abs().sum(1) > 0).all()) and float(g[2].abs().sum()) == 0.0
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        m.embeddings[0].normal_()
        assert torch.equal(m2(x, t, c), base(x, t))  # the copy's hook reads the copy's (zero) embedding


def test_module_mode_bad_input():
    base = EpsMLP(3, hidden=8, depth=1, time_dim=8)
    with pytest.raises(ValueError, match="label_module"):
        SteeredModel(copy.deepcopy(base), n_labels=2, label_mode="module", label_module="nope", label_shape=(8,))
    with pytest.raises(ValueError, match="label_module, label_shape"):
        SteeredModel(copy.deepcopy(base), n_labels=2, label_mode="module")
    with pytest.raises(ValueError, match="label_mode"):
        SteeredModel(copy.deepcopy(base), n_labels=2, label_mode="input")
    m = SteeredModel(copy.deepcopy(base), n_labels=2, label_mode="module", label_module="time", label_shape=(6,))
    with pytest.raises(ValueError, match="label_shape"):
        m(torch.randn(2, 3), torch.rand(2), torch.tensor([0, 1]))
