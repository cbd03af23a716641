"""The image commands refuse bad input before any work: every argument and the output folder are checked
before a model is loaded, and the CLI turns expected failures into one line naming the argument or file
with exit status 2; unexpected errors keep their traceback."""
import os
import tempfile

import pytest
import torch

pytest.importorskip("diffusers")

from diffsteer.cli import main

FT = ["sd-finetune", "--tiny", "--sample-steps", "3", "--steps", "1", "--no-progress", "--device", "cpu"]
SAMPLE = ["sd-sample", "--tiny", "--steps", "2", "--device", "cpu"]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a pipeline fails the test: the error must come before it."""

    def boom(*a, **k):
        raise AssertionError("a pipeline was loaded before the arguments were checked")

    import imaging.pipeline
    import imaging.tiny

    monkeypatch.setattr(imaging.tiny, "tiny_pipeline", boom)
    monkeypatch.setattr(imaging.pipeline, "load_pipeline", boom)


def _err(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("diffsteer ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("cmd", [FT, SAMPLE])
def test_out_is_a_file_fails_before_loading(cmd, tmp_path, capsys, no_model):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert "--out" in _err(capsys, cmd + ["--out", str(f)])
    assert "--out" in _err(capsys, cmd + ["--out", str(f / "sub")])  # a file as a parent folder
    assert f.read_text() == "x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_not_writable_fails_before_loading(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "--out" in _err(capsys, FT + ["--out", str(ro / "run")])
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("opt, value", [("--eta", "1.5"), ("--eta", "inf"), ("--eta", "-0.1"),
                                        ("--guidance-scale", "nan"), ("--guidance-scale", "inf")])
@pytest.mark.parametrize("cmd", [FT, SAMPLE])
def test_eta_and_guidance_scale_refused(cmd, opt, value, tmp_path, capsys, no_model):
    line = _err(capsys, cmd + [opt, value, "--out", str(tmp_path / "o")])
    assert opt in line
    assert not (tmp_path / "o").exists()  # nothing created by a refused command


@pytest.mark.parametrize("k", ["-2", "1,-3", "a,b", "0", "3,1", "1,2,3", "9"])
def test_bad_k_names_k(k, tmp_path, capsys, no_model):
    line = _err(capsys, FT + ["--method", "draftk", "--k", k, "--out", str(tmp_path / "o")])
    assert "--k" in line


def test_refl_minimum_sample_steps_is_explained(tmp_path, capsys, no_model):
    """ReFL's default range stops up to 10 steps before the end: with 3 sample steps the message names
    both options and how to fix it; --refl-steps 1,3 is accepted (checked up to the model loading)."""
    line = _err(capsys, FT + ["--method", "refl", "--out", str(tmp_path / "o")])
    assert "--refl-steps" in line and "--sample-steps" in line
    with pytest.raises(AssertionError, match="pipeline was loaded"):
        main(FT + ["--method", "refl", "--refl-steps", "1,3", "--out", str(tmp_path / "o")])
    assert "--refl-steps" in _err(capsys, FT + ["--method", "refl", "--refl-steps", "3", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("opt, value", [("--lr", "inf"), ("--lr", "0"), ("--weight-decay", "-1"), ("--steps", "0"),
                                        ("--batch-size", "0"), ("--lam", "nan")])
def test_other_numbers_refused(opt, value, tmp_path, capsys, no_model):
    assert opt in _err(capsys, FT + [opt, value, "--out", str(tmp_path / "o")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("cmd", [FT, SAMPLE])
def test_cuda_without_cuda(cmd, tmp_path, capsys):
    argv = [a for a in cmd if a not in ("--device", "cpu")] + ["--device", "cuda", "--out", str(tmp_path / "o")]
    assert "--device" in _err(capsys, argv)


def test_bad_model_folders(tmp_path, capsys, no_model):
    assert "model_path" in _err(capsys, ["sd-sample", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text("{not json")
    line = _err(capsys, ["sd-finetune", "--model", str(bad), "--steps", "1", "--sample-steps", "2",
                         "--out", str(tmp_path / "o")])
    assert "model_index.json" in line


def test_bad_model_index_when_loading(tmp_path, capsys):
    """The same file found at load time (``load_pipeline``) is a ValueError naming it, not a JSON traceback."""
    from imaging.pipeline import load_pipeline

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(bad)


def test_lora_path_checked_before_loading(tmp_path, capsys, no_model):
    assert "--lora" in _err(capsys, SAMPLE + ["--lora", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert "--lora" in _err(capsys, SAMPLE + ["--lora", f"{tmp_path}:inf", "--out", str(tmp_path / "o")])


def test_fp16_on_cpu_refused_before_work(tmp_path, capsys):
    assert "--dtype" in _err(capsys, FT + ["--dtype", "float16", "--out", str(tmp_path / "o")])


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    import imaging.cli

    def fail(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(imaging.cli, "run_sample", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(SAMPLE + ["--out", str(tmp_path / "o")])


def test_checkpoint_errors_and_missing_extra_are_one_line(monkeypatch, tmp_path, capsys):
    """A lower layer's checkpoint error class (named CheckpointError / DiffsteerError) and a missing module of
    the imaging extra are expected failures; the latter says which pip install to run."""
    import imaging.cli

    class CheckpointError(Exception):
        pass

    def corrupt(args):
        raise CheckpointError(f"out: checkpoint {tmp_path}/checkpoint/params.safetensors is corrupt")

    monkeypatch.setattr(imaging.cli, "run_finetune_cmd", corrupt)
    assert "params.safetensors" in _err(capsys, FT + ["--out", str(tmp_path / "o")])

    def missing(args):
        raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")

    monkeypatch.setattr(imaging.cli, "run_finetune_cmd", missing)
    assert "pip install" in _err(capsys, FT + ["--out", str(tmp_path / "o")])

    def other(args):
        raise ModuleNotFoundError("No module named 'nothere'", name="nothere")

    monkeypatch.setattr(imaging.cli, "run_finetune_cmd", other)
    with pytest.raises(ModuleNotFoundError):
        main(FT + ["--out", str(tmp_path / "o")])


def test_tiny_pipeline_leaves_no_temp_folder(monkeypatch, tmp_path):
    """Each --tiny run built its tokenizer in a diffsteer-tok-* temp folder and never removed it."""
    from imaging.tiny import tiny_pipeline

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    p = tiny_pipeline()
    assert list(tmp_path.glob("diffsteer-tok-*")) == []
    assert p.tokenizer("a photo of a cat").input_ids[0] == p.tokenizer.bos_token_id


def test_default_model_not_built_before_the_arguments_are_checked(monkeypatch, tmp_path, capsys):
    """Without --model the digits pipeline is the default, trained on first use: a bad argument or --out is
    reported before that (minutes of) work starts."""
    import imaging.digits_pipeline

    def boom(*a, **k):
        raise AssertionError("the default pipeline was built before the arguments were checked")

    monkeypatch.setattr(imaging.digits_pipeline, "ensure_digits_pipeline", boom)
    base = ["sd-finetune", "--steps", "1", "--sample-steps", "2", "--no-progress", "--device", "cpu"]
    assert "--eta" in _err(capsys, base + ["--eta", "2", "--out", str(tmp_path / "o")])
    f = tmp_path / "f"
    f.write_text("")
    assert "--out" in _err(capsys, base + ["--out", str(f)])
    assert "--eta" in _err(capsys, ["sd-sample", "--eta", "2", "--out", str(tmp_path / "s")])
