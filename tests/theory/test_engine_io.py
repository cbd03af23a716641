"""theory.io, the one atomic writer: the final file's mode follows the umask, JSON is strict, no temporary
file is left behind, and an interrupted write leaves the old file intact."""
import json
import math
import os

import numpy as np
import pytest
import torch

from theory.io import atomic_save_tensors, atomic_write_bytes, atomic_write_json, to_strict_json


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_mode_follows_umask_and_no_temp_left(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "b.json", {"v": 1})
        atomic_save_tensors({"t": torch.ones(2)}, tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    for name in ("a.bin", "b.json", "c.safetensors"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == 0o666 & ~umask, name
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.json", "c.safetensors"]


def test_strict_json():
    obj = {"nan": float("nan"), "inf": -math.inf, "t": (1, 2.5), "np": np.float32(0.5), "torch": torch.tensor(3),
           "arr": np.arange(2), 1: None}
    assert to_strict_json(obj) == {"nan": None, "inf": None, "t": [1, 2.5], "np": 0.5, "torch": 3, "arr": [0, 1],
                                   "1": None}


def test_strict_json_file_and_bad_input(tmp_path):
    atomic_write_json(tmp_path / "h.json", [{"kl": float("nan")}])
    assert json.loads((tmp_path / "h.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == [{"kl": None}]
    with pytest.raises(ValueError, match="obj"):
        atomic_write_json(tmp_path / "x.json", {"f": object()})
    with pytest.raises(ValueError, match="data"):
        atomic_write_bytes(tmp_path / "y", "text")
    with pytest.raises(ValueError, match="folder"):
        atomic_write_bytes(tmp_path, b"x")


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    atomic_save_tensors({"t": torch.zeros(3)}, path)

    def boom(a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_tensors({"t": torch.ones(3)}, path)
    monkeypatch.undo()
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["t"], torch.zeros(3))
    assert os.listdir(tmp_path) == ["p.safetensors"]


def test_cached_network_leaves_the_global_random_state_as_a_cache_hit_does(tmp_path, monkeypatch):
    """theory.nets.cached: training on a miss must not advance torch's global generator, so whatever is
    drawn after the call is the same whether the network was trained now or loaded from the cache."""
    import torch
    from torch import nn

    from theory.nets import cached

    monkeypatch.setenv("DIFFSTEER_CACHE", str(tmp_path))

    def train(m):
        with torch.no_grad():
            m.weight.add_(torch.randn_like(m.weight))  # consumes the global generator

    after = []
    for _ in range(2):  # a miss, then a hit
        torch.manual_seed(123)
        net = cached("zz_rng", {"v": 1}, lambda: nn.Linear(3, 2), train)
        after.append((torch.randn(4), net.weight.detach().clone()))
    assert torch.equal(after[0][0], after[1][0]) and torch.equal(after[0][1], after[1][1])
    torch.manual_seed(123)
    assert torch.equal(torch.randn(4), after[0][0])  # the call left the global state as it found it


def test_cached_network_is_a_function_of_its_key_not_of_what_ran_before(tmp_path, monkeypatch):
    """theory.nets.cached: the initial weights (and so the trained network) do not depend on the global
    generator's state before the call - a figure's pre-trained network is the same whichever figures ran
    before it in the process; two keys give two different initialisations."""
    import torch
    from torch import nn

    from theory.nets import cached

    nets = []
    for i, prior in enumerate((1, 2)):  # two fresh caches, two different histories of the global generator
        monkeypatch.setenv("DIFFSTEER_CACHE", str(tmp_path / str(i)))
        torch.manual_seed(prior)
        torch.randn(prior * 10)
        nets.append(cached("zz_init", {"v": 1}, lambda: nn.Linear(3, 2), lambda m: None).weight.detach().clone())
    assert torch.equal(nets[0], nets[1])
    other = cached("zz_init", {"v": 2}, lambda: nn.Linear(3, 2), lambda m: None).weight
    assert not torch.equal(other, nets[0])
