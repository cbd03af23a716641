"""Reliability of the fine-tuning loop and its checkpoints (theory.engine.loop / checkpoint): a non-finite
update or gradient stops the run before it reaches a checkpoint, checkpoints hold no pickle, resume refuses
other settings and incomplete checkpoints, the history is strict JSON, and a run interrupted anywhere - at
any step, or between the files of a checkpoint write - resumes to the uninterrupted run bit for bit."""
import json
import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from theory.engine import DRaFTK, FinetuneConfig, NonFiniteError, NonFiniteRewardError, SteeredModel, finetune
from theory.nets import EpsMLP
from theory.schedules import LinearVP

SCH = LinearVP()


def _model(seed=0):
    torch.manual_seed(seed)
    return SteeredModel(EpsMLP(2, hidden=8, depth=1), lora_rank=2)


def _cfg(**kw):
    base = dict(steps=4, batch_size=8, n_steps=4, method="ddim", eta=1.0, lr=1e-2, seed=3, progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def _sampler(n, g):
    return torch.randn(n, 2, generator=g)


def toward(x0, cond=None):
    return -((x0 - torch.tensor([1.5, -0.5])) ** 2).sum(1)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _finite_checkpoint(out):
    from safetensors.torch import load_file

    t = load_file(str(out / "checkpoint" / "params.safetensors"))
    return all(bool(torch.isfinite(v).all()) for v in t.values())


def test_lr_inf_stops_before_a_nonfinite_checkpoint(tmp_path):
    """lr = inf: step 1's AdamW update makes the parameters non-finite; the error names the step, a
    parameter and the learning rate, no checkpoint is written, and none is claimed."""
    with pytest.raises(NonFiniteError) as e:
        finetune(_model(), SCH, toward, DRaFTK(1), _cfg(lr=float("inf"), ckpt_every=1, out_dir=str(tmp_path)),
                 x_T_sampler=_sampler)
    msg = str(e.value)
    assert "step 1" in msg and "lora_" in msg and "learning rate" in msg and "no checkpoint was written" in msg
    assert not (tmp_path / "checkpoint").exists()


def test_nan_gradient_of_a_finite_reward_keeps_the_last_checkpoint(tmp_path):
    """r + sqrt(0 * x0[:, 0]) is finite but its gradient is NaN (d sqrt(u)/du at 0 = inf, times 0): the
    run stops at that step naming a gradient, the step-2 checkpoint stays finite and resumes."""
    calls = []

    def nan_grad_from_step_3(x0, cond=None):
        calls.append(1)
        r = toward(x0)
        return r + (x0[:, 0] * 0).sqrt() if len(calls) >= 3 else r

    with pytest.raises(NonFiniteError) as e:
        finetune(_model(), SCH, nan_grad_from_step_3, DRaFTK(1), _cfg(ckpt_every=1, out_dir=str(tmp_path)),
                 x_T_sampler=_sampler)
    msg = str(e.value)
    assert "gradient of" in msg and "step 3" in msg and "checkpoint of step 2" in msg
    assert _finite_checkpoint(tmp_path)
    h = finetune(_model(), SCH, toward, DRaFTK(1), _cfg(ckpt_every=1, out_dir=str(tmp_path)), x_T_sampler=_sampler)
    assert [r["step"] for r in h] == [1, 2, 3, 4]


def test_nonfinite_reward_claims_a_checkpoint_only_when_one_exists():
    def nan_reward(x0, cond=None):
        return toward(x0) * float("nan")

    with pytest.raises(NonFiniteRewardError, match="no checkpoint was written"):
        finetune(_model(), SCH, nan_reward, DRaFTK(1), _cfg(), x_T_sampler=_sampler)


def test_crafted_pickle_in_a_checkpoint_is_refused_without_running_it(tmp_path):
    """A crafted state.pt whose unpickling would create a file, beside valid-looking files: refused by
    name, and the file is never created."""
    ck = tmp_path / "checkpoint"
    ck.mkdir()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (ck / "state.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="state.pt"):
        finetune(_model(), SCH, toward, DRaFTK(1), _cfg(out_dir=str(tmp_path)), x_T_sampler=_sampler)
    assert not marker.exists()
    # a pickle in place of a safetensors / JSON file is read as data and refused, naming the file
    finetune(_model(), SCH, toward, DRaFTK(1), _cfg(steps=1, out_dir=str(tmp_path / "b")), x_T_sampler=_sampler)
    (tmp_path / "b" / "checkpoint" / "rng.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="rng.safetensors"):
        finetune(_model(), SCH, toward, DRaFTK(1), _cfg(steps=2, out_dir=str(tmp_path / "b")), x_T_sampler=_sampler)
    (tmp_path / "b" / "checkpoint" / "state.json").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="state.json"):
        finetune(_model(), SCH, toward, DRaFTK(1), _cfg(steps=2, out_dir=str(tmp_path / "b")), x_T_sampler=_sampler)
    assert not marker.exists()


def test_resume_refuses_other_settings_and_allows_more_steps(tmp_path):
    finetune(_model(), SCH, toward, DRaFTK(1), _cfg(steps=2, out_dir=str(tmp_path)), x_T_sampler=_sampler)
    with pytest.raises(ValueError) as e:
        finetune(_model(), SCH, toward, DRaFTK(2), _cfg(steps=3, lr=0.5, eta=0.5, out_dir=str(tmp_path)),
                 x_T_sampler=_sampler)
    msg = str(e.value)
    for field in ("config.lr", "config.eta", "strategy"):
        assert field in msg
    assert "config.steps" not in msg and "new out_dir" in msg and "steps" in msg
    torch.manual_seed(1)
    other_rank = SteeredModel(EpsMLP(2, hidden=8, depth=1), lora_rank=3)
    with pytest.raises(ValueError, match="params.safetensors"):
        finetune(other_rank, SCH, toward, DRaFTK(1), _cfg(steps=3, out_dir=str(tmp_path)), x_T_sampler=_sampler)
    h = finetune(_model(), SCH, toward, DRaFTK(1), _cfg(steps=3, ckpt_every=1, out_dir=str(tmp_path)),
                 x_T_sampler=_sampler)  # more steps and another checkpoint period: allowed
    assert [r["step"] for r in h] == [1, 2, 3]


def test_missing_file_in_checkpoint_is_an_error_and_history_is_strict_json(tmp_path):
    finetune(_model(), SCH, toward, DRaFTK(1), _cfg(steps=2, out_dir=str(tmp_path)), x_T_sampler=_sampler)
    text = (tmp_path / "history.json").read_text()
    rows = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in history.json"))
    assert rows[0]["kl"] is None  # no KL computed (lam = 0): null, not NaN
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"bare {c} in state.json"))
    assert state["step"] == 2
    os.remove(tmp_path / "checkpoint" / "optimizer.safetensors")
    with pytest.raises(ValueError, match="lacks optimizer.safetensors"):
        finetune(_model(), SCH, toward, DRaFTK(1), _cfg(steps=3, out_dir=str(tmp_path)), x_T_sampler=_sampler)


class _Interrupt(Exception):
    pass


_STRAIGHT = {}


def _rows(h):
    """History rows without wall times, NaN as None (NaN != NaN would fail any comparison)."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items() if k != "wall_time"}
            for r in h]


def _straight(strategy):
    if strategy not in _STRAIGHT:
        m = _model()
        h = finetune(m, SCH, toward, strategy, _cfg(steps=5), x_T_sampler=_sampler)
        _STRAIGHT[strategy] = (_params(m), _rows(h))
    return _STRAIGHT[strategy]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_step=st.integers(1, 5), kill_write=st.integers(0, 12), in_write=st.booleans(),
       k=st.sampled_from([1, (1, 4)]))
def test_interrupted_runs_resume_bitwise(tmp_path_factory, kill_step, kill_write, in_write, k):
    """Property: a 5-step run (checkpoint every 2 steps) interrupted at a random step - by an exception
    from the callback, or inside a checkpoint write after a random number of file operations (each
    os.replace of a file or of the checkpoint folder) - and then resumed (possibly several times), ends
    with the parameters and history of the uninterrupted run, bit for bit (wall times aside)."""
    strategy = DRaFTK(k)
    want_params, want_rows = _straight(strategy)
    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(steps=5, ckpt_every=2, out_dir=str(out))
    real_replace = os.replace
    count = [0]

    def faulty_replace(a, b):
        count[0] += 1
        if count[0] == kill_write + 1:
            raise _Interrupt("killed inside a checkpoint write")
        return real_replace(a, b)

    def kill(step, row):
        if not in_write and step == kill_step:
            raise _Interrupt("killed after a step")

    try:
        if in_write:
            os.replace = faulty_replace
        finetune(_model(), SCH, toward, strategy, cfg, x_T_sampler=_sampler, callback=kill)
    except _Interrupt:
        pass
    finally:
        os.replace = real_replace
    m = _model()  # a fresh process: a new model, the run's state only from the checkpoint (if any)
    h = finetune(m, SCH, toward, strategy, cfg, x_T_sampler=_sampler)
    got = _params(m)
    for n in want_params:
        assert torch.equal(got[n], want_params[n]), n
    assert _rows(h) == want_rows


def test_unwritable_out_dir_fails_before_any_work(tmp_path):
    calls = []

    def counting(x0, cond=None):
        calls.append(1)
        return toward(x0)

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out_dir: .* is a file"):
        finetune(_model(), SCH, counting, DRaFTK(1), _cfg(out_dir=str(tmp_path / "file")), x_T_sampler=_sampler)
    assert not calls
