"""Data-parallel ``sd-finetune`` (imaging.distributed on accelerate): two CPU processes (gloo) with per-process
batch b train the same LoRA as one process with the combined batch 2b, also across a resume, and only the
main process writes."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from imaging.finetune import SDFinetuneConfig, run_finetune

# DRaFT-K with K drawn per sample from [1, 3], stochastic DDIM (eta 0.5: sampler noise), CFG (the UNet sees
# a doubled batch), two prompts: every random draw the engine slices per rank is exercised.
ARGS = ["sd-finetune", "--tiny", "--prompt", "a red dog", "a photo of a cat", "--method", "draftk", "--k", "1,3",
        "--sample-steps", "3", "--eta", "0.5", "--guidance-scale", "2", "--lr", "1e-2", "--seed", "3",
        "--no-progress", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def test_two_processes_equal_one_with_the_combined_batch_across_a_resume(tmp_path):
    """torchrun starts 2 processes running ``diffsteer sd-finetune --batch-size 1``: 2 steps with a
    checkpoint after each, then the same command with --steps 3 (resumes from the step-2 checkpoint). One
    process in this test runs 3 steps with --batch-size 2. The two runs differ only in the order of float
    sums (gloo's mean of two per-rank gradient means vs. autograd's one batch mean; batch-1 vs. batch-2
    convolutions), a relative ~1e-7 of each sum (float32 unit roundoff 6e-8 times a few terms):

    - per step, the mean reward and the gradient norm agree to a relative 1e-5 (measured 5e-8 and 6e-7);
    - the LoRA factors agree to 1e-3 of the total update budget lr x steps = 3e-5 (measured 1.4e-5).
      AdamW divides each gradient entry by its running RMS (+ eps 1e-8), so an entry whose gradient is
      near zero turns its float-order error into a visible part of its normalised step; the budget, not
      the entries' size, is the scale of that error."""
    script = tmp_path / "ranks.py"
    out = tmp_path / "two"
    script.write_text(textwrap.dedent(f"""
        import sys
        from diffsteer.cli import main
        args = {ARGS!r} + ["--batch-size", "1", "--out", {str(out)!r}]
        assert main(args + ["--steps", "2", "--ckpt-every", "1"]) == 0
        assert main(args + ["--steps", "3", "--ckpt-every", "1"]) == 0   # resumes from the step-2 checkpoint
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DIFFSTEER_CACHE=str(tmp_path / "cache"))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    from diffsteer.cli import main

    assert main(ARGS + ["--batch-size", "2", "--steps", "3", "--out", str(tmp_path / "one")]) == 0
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]

    two, one = _lora(out), _lora(tmp_path / "one")
    assert set(two) == set(one)
    err = max(float((two[k] - one[k]).abs().max()) for k in one)
    assert err <= 1e-3 * 1e-2 * 3, err
    moved = max(float((one[k]).abs().max()) for k in one if "lora.up" in k or "lora_B" in k)
    assert moved > 0  # B started at zero: three steps moved it
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 3
    h2 = json.loads((out / "history.json").read_text())
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    rows2 = h2 if isinstance(h2, list) else h2["history"]
    rows1 = h1 if isinstance(h1, list) else h1["history"]
    assert [r["step"] for r in rows2] == [1, 2, 3]
    for a, b in zip(rows1, rows2):  # the history's reward is the mean over the ranks = the combined batch's
        assert abs(a["reward_mean"] - b["reward_mean"]) <= 1e-5 * abs(a["reward_mean"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]


class _Rank1:
    """A second rank of two whose reduction is the identity (stands in for the other process)."""

    rank, world_size, is_main = 1, 2, False

    def all_reduce_mean_(self, tensors):
        return None

    def barrier(self):
        return None


def test_only_the_main_process_writes(tmp_path):
    """A non-main rank trains (its LoRA moves) but creates nothing under --out: no folder, no checkpoint,
    no LoRA, no summary."""
    out = tmp_path / "out"
    cfg = SDFinetuneConfig(tiny=True, prompts=("a red dog",), method="draftk", k="1", steps=2, batch_size=1,
                           sample_steps=2, guidance_scale=1.0, lr=1e-2, ckpt_every=1, out=str(out), progress=False,
                           device="cpu")
    s = run_finetune(cfg, dist=_Rank1())
    assert s["steps"] == 2 and s["world_size"] == 2
    assert not out.exists()


def test_single_process_without_launcher(monkeypatch):
    """No launcher (WORLD_SIZE unset or 1): no accelerate state is created, the run is single-process."""
    from imaging.distributed import from_environment

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert from_environment("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert from_environment("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        from_environment("cpu")


def test_accelerate_reduce_is_the_mean_in_one_process():
    """``AccelerateDistributed`` over a one-process Accelerator: rank 0 of 1, main, the mean of one rank is
    the tensor itself (the reduce path with a flat buffer returns every tensor unchanged in shape/value)."""
    from accelerate import Accelerator

    from imaging.distributed import AccelerateDistributed

    d = AccelerateDistributed(Accelerator(cpu=True))
    assert (d.rank, d.world_size, d.is_main) == (0, 1, True)
    ts = [torch.arange(6.0).reshape(2, 3), torch.ones(4)]
    d.all_reduce_mean_(ts)
    assert torch.equal(ts[0], torch.arange(6.0).reshape(2, 3)) and torch.equal(ts[1], torch.ones(4))
    d.barrier()
