"""Image rewards (imaging.rewards, imaging.aesthetic, imaging.clip_score) on tiny models built from configs:
the true JPEG size against PIL, the differentiable JPEG reward's gradient against finite differences, CLIP
preprocessing against transformers' processor, the aesthetic and CLIP scores against CLIPModel's own
outputs, the CTRL classifier reward, the registry, and the errors for missing weight files."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("kornia")

from imaging.aesthetic import AestheticMLP, AestheticReward, load_head  # noqa: E402
from imaging.clip_score import ClipPreprocess, ClipScore, shortest_side_size  # noqa: E402
from imaging.rewards import (  # noqa: E402
    IMAGE_REWARDS,
    JpegRoundTrip,
    LatentReward,
    TemperatureScaled,
    classifier_reward,
    jpeg_compressibility,
    jpeg_rank_correlation,
    jpeg_size_kb,
    make_reward,
    reward_names,
    to_uint8,
)
from imaging.tiny import tiny_pipeline, tiny_tokenizer  # noqa: E402

EPS64 = torch.finfo(torch.float64).eps


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def pipe64():
    p = tiny_pipeline(seed=0)
    p.vae.to(torch.float64)
    return p


def _grid_images(B, H, W, seed=0, smooth=True):
    """Random images on the uint8 grid (k / 255), optionally smoothed so JPEG has structure to keep."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    if smooth:
        x = F.avg_pool2d(x, 3, 1, 1)
    return torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).double() / 255.0


# --------------------------------------------------------------------------------------------- JPEG rewards

def test_true_jpeg_size_is_pil_file_size_per_image():
    """jpeg_size_kb on a batch = the byte count of PIL's JPEG (quality 95) of each uint8 image / 1000, serial
    and threaded; compressibility is its negation; neither is differentiable."""
    from PIL import Image

    x = _grid_images(5, 24, 40, smooth=False)
    x[0] = 0.5  # a flat image
    expected = []
    for a in (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        expected.append(len(buf.getvalue()) / 1000.0)
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.equal(jpeg_size_kb(x), expected)
    assert torch.equal(jpeg_size_kb(x, workers=3), expected)
    assert torch.equal(jpeg_compressibility(x), -expected)
    assert expected[0] < expected[1:].min()  # the flat image is the smallest file
    big = x.repeat_interleave(3, -2).repeat_interleave(3, -1)  # nearest 3x upscale
    assert torch.equal(jpeg_size_kb(x, upscale=3), jpeg_size_kb(big))
    with pytest.raises(ValueError, match="upscale"):
        jpeg_size_kb(x, upscale=1.5)
    assert jpeg_size_kb.differentiable is False and jpeg_compressibility.differentiable is False
    with pytest.raises(ValueError, match="img"):
        jpeg_size_kb(torch.zeros(2, 1, 8, 8))


def test_diff_jpeg_round_trip_is_a_jpeg_round_trip():
    """kornia's differentiable codec at quality q lands nearer PIL's real JPEG round trip at q than the image
    itself does (it reproduces JPEG's distortion, not some other filter), for two qualities."""
    from PIL import Image

    x = _grid_images(3, 32, 32)
    for q in (25, 50):
        real = []
        for a in to_uint8(x):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=q)
            buf.seek(0)
            real.append(np.asarray(Image.open(buf), dtype=np.float64) / 255.0)
        P = torch.from_numpy(np.stack(real)).permute(0, 3, 1, 2)
        J = JpegRoundTrip(q).round_trip(x)
        assert (J - P).norm() < (x - P).norm()


def test_diff_jpeg_reward_signs_and_order():
    """r = -mean |x - J(x)|^2 <= 0, incompressibility = -r; on a family x_s = 0.5 + s n (fixed noise n, s
    increasing) the true JPEG size and the differentiable incompressibility both increase strictly with s,
    so they rank the family identically (Spearman 1)."""
    g = torch.Generator().manual_seed(1)
    n = torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64)
    fam = torch.cat([(0.5 + s * n).clamp(0, 1) for s in torch.linspace(0.0, 0.2, 6).tolist()])
    fam = torch.from_numpy(to_uint8(fam)).permute(0, 3, 1, 2).double() / 255.0
    r = JpegRoundTrip(25)(fam)
    assert (r <= 0).all()
    assert torch.equal(JpegRoundTrip(25, incompressible=True)(fam), -r)
    assert (jpeg_size_kb(fam).diff() > 0).all() and ((-r).diff() > 0).all()
    assert jpeg_rank_correlation(fam, quality=25) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="quality"):
        JpegRoundTrip(0)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 4), H=st.integers(3, 20), W=st.integers(3, 20), seed=st.integers(0, 2**16))
def test_jpeg_rewards_of_a_batch_are_those_of_each_image(B, H, W, seed):
    """Identity: a batch's rewards are the rewards of its images one at a time (any size; kornia pads to 16)."""
    x = _grid_images(B, H, W, seed=seed, smooth=False)
    one = lambda f: torch.cat([f(x[i:i + 1]) for i in range(B)])  # noqa: E731
    assert torch.equal(jpeg_size_kb(x), one(jpeg_size_kb))
    r = JpegRoundTrip(25)
    assert torch.allclose(r(x), one(r), rtol=1e-12, atol=1e-15)


def _fd_check(f, x, n_dirs=3, h=1e-6, seed=0):
    """Directional derivatives of sum_b f(x)_b along random unit directions d: autograd against the central
    difference D(h) = (f(x + h d) - f(x - h d)) / 2h, in float64.

    Tolerance: D(h) = f' + c h^2 + O(h^4), so its truncation error is estimated by Richardson as
    |D(2h) - D(h)| / 3 (taken twice for safety); its rounding error is at most delta / h with delta = 64 eps
    the absolute error of one evaluation (the codec's 8x8 DCT sums 64 products per coefficient; the rewards
    are O(1)). A jump of the piecewise-smooth reward inside [x - h, x + h] would make the error ~ jump / 2h,
    three times this tolerance, so it cannot pass unnoticed. Returns the worst |error| and |derivative|."""
    x = x.detach().requires_grad_(True)
    grad, = torch.autograd.grad(f(x).sum(), x)
    g = torch.Generator().manual_seed(seed)
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for _ in range(n_dirs):
            d = torch.randn(x.shape, generator=g, dtype=x.dtype)
            d /= d.norm()
            ad = float((grad * d).sum())
            D = lambda s: float((f(x + s * d).sum() - f(x - s * d).sum()) / (2 * s))  # noqa: E731
            Dh, D2h = D(h), D(2 * h)
            tol = 2 * abs(D2h - Dh) / 3 + 64 * EPS64 / h
            assert abs(Dh - ad) <= tol, (Dh, ad, tol)
            worst, scale = max(worst, abs(Dh - ad)), max(scale, abs(ad))
    return worst, scale


def test_diff_jpeg_gradient_matches_finite_differences():
    x = (0.2 + 0.6 * torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    for inc in (False, True):
        _fd_check(JpegRoundTrip(25, incompressible=inc), x)


def test_diff_jpeg_gradient_through_the_decoder_matches_finite_differences(pipe64):
    """The latent reward r(x0) = JPEG-reward(decode(x0)): gradient w.r.t. the latents (tiny VAE, float64)."""
    reward = make_reward(pipe64, "diff-compressibility")
    assert reward.differentiable
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    worst, scale = _fd_check(reward, z)
    assert scale > 0


# ------------------------------------------------------------------------------------- CLIP preprocessing

def _vertical_inf_norm(H: int, h: int) -> float:
    """max_i sum_j |W_ij| of the bicubic (antialiased) resize H -> h, W read off the identity's columns."""
    eye = torch.eye(H, dtype=torch.float64)[None, None]  # rows as the height axis
    Wm = F.interpolate(eye, size=(h, H), mode="bicubic", antialias=True, align_corners=False)[0, 0]
    return float(Wm.abs().sum(1).max())


@pytest.mark.parametrize("H, W", [(32, 32), (300, 260), (40, 50), (224, 224)])
def test_clip_preprocess_equals_transformers_processor(H, W):
    """ClipPreprocess (torch, differentiable) = CLIPImageProcessor (PIL, uint8) on the same uint8 images.

    Tolerance: both resize with PIL's bicubic filter, width pass then height pass, clipping after each; PIL
    also rounds to uint8 after each pass. The first rounding (<= 1/2 level) is carried through the height pass
    with gain at most S = max_i sum_j |W_ij| (its weights, negative lobes included), the second adds 1/2 level,
    PIL's 22-bit fixed-point weights add < 1e-3 level: |diff| <= (S/2 + 1/2 + 1e-3) / 255 / min(std) in
    normalised units, plus float32 rounding (1e-5). The reference is the PIL processor (transformers 5 picks
    a torchvision one instead when torchvision is installed; it resizes in one float pass, without the
    intermediate rounding and clipping)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers < 5: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as Processor

    proc = Processor()
    prep = ClipPreprocess.from_processor(proc)
    x = _grid_images(2, H, W, seed=H + W, smooth=False)
    x[1] = F.avg_pool2d(x[1:2], 5, 1, 2)[0]  # one sharp, one smooth image
    x = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).double() / 255.0  # both read the same uint8 values
    ref = torch.as_tensor(np.asarray(proc(images=list(to_uint8(x)), return_tensors="np")["pixel_values"]))
    ours = prep(x.float()).double()
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    h, _ = shortest_side_size(H, W, 224)
    S = _vertical_inf_norm(H, h) if h != H else 0.0
    tol = (S / 2 + 0.5 + 1e-3) / 255 / min(proc.image_std) + 1e-5
    err = float((ours - ref).abs().max())
    assert err <= tol, (err, tol)
    print(f"preprocessing {H}x{W}: max |torch - CLIPImageProcessor| = {err:.4f} (tolerance {tol:.4f}, S = {S:.3f})")


def test_clip_preprocess_is_differentiable():
    x = torch.rand(1, 3, 20, 30, dtype=torch.float64, requires_grad=True)
    ClipPreprocess(16, (16, 16))(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="crop"):
        ClipPreprocess(16, (20, 20))(x)


# ------------------------------------------------------------------------------------------- tiny CLIPs

TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8, projection_dim=8)


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A tiny CLIPModel + tokenizer + image processor (32 px) saved with save_pretrained, float64."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    tok = tiny_tokenizer(folder / "tok")
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=len(tok), max_position_embeddings=16, projection_dim=8,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=8)).double()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_aesthetic_head_has_the_original_state_dict_keys():
    keys = [k for k in AestheticMLP(8).state_dict() if k.endswith("weight")]
    assert keys == ["layers.0.weight", "layers.2.weight", "layers.4.weight", "layers.6.weight", "layers.7.weight"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_reward_loads_local_files_and_scores(tiny_clip_folder, tmp_path, suffix, pipe64):
    """a(x) = head(normalise(CLIP image features)) with the tower read from a whole CLIPModel folder and the
    head from .pth / .safetensors; equal to the same formula through CLIPModel.get_image_features; gradients
    reach the latents through the decoder and match finite differences."""
    from safetensors.torch import save_file
    from transformers import CLIPModel

    torch.manual_seed(1)
    head = AestheticMLP(8).double().eval()
    path = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save(head.state_dict(), path)
    else:
        save_file(head.state_dict(), str(path))
    reward = AestheticReward(clip_path=tiny_clip_folder, head_path=path, dtype=torch.float64)
    assert reward.differentiable and not reward.head.training
    x = _grid_images(3, 40, 40).double()
    clip = CLIPModel.from_pretrained(str(tiny_clip_folder), local_files_only=True).double()
    feats = clip.get_image_features(pixel_values=reward.preprocess(x)).pooler_output
    expected = head(F.normalize(feats, dim=-1)).squeeze(-1)
    assert torch.allclose(reward(x), expected, rtol=1e-12, atol=1e-12)

    latent = LatentReward(pipe64, reward)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    worst, scale = _fd_check(latent, z)
    assert scale > 0


def test_aesthetic_from_local_is_the_constructor(tiny_clip_folder, tmp_path):
    from imaging.aesthetic import AestheticScorer

    torch.save(AestheticMLP(8).state_dict(), tmp_path / "head.pth")
    a = AestheticScorer.from_local(tiny_clip_folder, tmp_path / "head.pth")
    b = AestheticReward(tiny_clip_folder, tmp_path / "head.pth")
    x = _grid_images(2, 32, 32).float()
    assert torch.equal(a(x), b(x))


def test_aesthetic_missing_files_name_the_argument(tiny_clip_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="clip_path.*nowhere"):
        AestheticReward(clip_path=tmp_path / "nowhere", head_path=tmp_path / "head.pth")
    with pytest.raises(FileNotFoundError, match=r"head_path.*missing\.pth.*sac\+logos\+ava1-l14-linearMSE"):
        AestheticReward(clip_path=tiny_clip_folder, head_path=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="head_path: not given"):
        load_head(None)


def test_aesthetic_head_refuses_pickled_code_and_wrong_keys(tmp_path):
    """.pth is read with weights_only=True (a pickled object is refused), and a state dict of another
    shape is an error naming head_path."""
    bad = tmp_path / "code.pth"
    torch.save({"layers.0.weight": torch.zeros(1), "obj": _Pickled()}, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_head(bad, 8)
    wrong = tmp_path / "wrong.pth"
    torch.save(nn.Linear(8, 1).state_dict(), wrong)
    with pytest.raises(ValueError, match="head_path"):
        load_head(wrong, 8)


class _Pickled:
    pass


def test_clip_score_is_clip_logit(tiny_clip_folder, pipe64):
    """s(x, p) = exp(logit_scale) cos(E_img(x), E_txt(p)) equals CLIPModel's own logits_per_image on the same
    pixel values and tokens; prompt indices and prompt strings give the same score; the gradient w.r.t. the
    latents (through the tiny decoder, float64) matches finite differences."""
    from transformers import CLIPModel

    prompts = ["a photo of a cat", "a painting of a red dog"]
    score = ClipScore(model_path=tiny_clip_folder, prompts=prompts, dtype=torch.float64)
    x = _grid_images(2, 32, 32)
    s = score(x, torch.tensor([1, 0]))
    clip = CLIPModel.from_pretrained(str(tiny_clip_folder), local_files_only=True).double()
    tok = score.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    logits = clip(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                  pixel_values=score.preprocess(x)).logits_per_image  # (image, text)
    assert torch.allclose(s, torch.stack([logits[0, 1], logits[1, 0]]), rtol=1e-10, atol=1e-10)
    assert torch.allclose(score(x, [prompts[1], prompts[0]]), s, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cond"):
        score(x, torch.tensor([0, 2]))

    reward = make_reward(pipe64, "pickscore", model_path=tiny_clip_folder, prompts=prompts, dtype=torch.float64)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    worst, scale = _fd_check(lambda x: reward(x, torch.tensor([0, 1])), z)
    assert scale > 0


def test_clip_score_missing_folder_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_path"):
        ClipScore(model_path=tmp_path / "no-pickscore", prompts=["a cat"])


# ----------------------------------------------------------------------------------- classifier reward

def test_classifier_reward_is_temperature_scaled_log_likelihood(pipe64):
    """r(x0, y) = log softmax(z(x) / T)[y] on latents and on decoded images; two classifiers sum (CTRL's
    multi-label reward); wrong labels are errors."""
    torch.manual_seed(0)
    on_lat = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).double()
    on_img = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 16, 4)).double()
    z = torch.randn(5, 4, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    T = 1.7
    r = classifier_reward(pipe64, on_lat, on="latents", temperature=[T])
    assert r.differentiable
    logits = on_lat(z)
    expected = logits[torch.arange(5), y] / T - torch.logsumexp(logits / T, -1)
    assert torch.allclose(r(z, y), expected, rtol=1e-12, atol=1e-12)
    by_name = make_reward(pipe64, "classifier", on_lat, on="latents", temperature=[T])
    assert torch.equal(by_name(z, y), r(z, y))

    from imaging.pipeline import decode_latents

    y2 = torch.tensor([3, 0, 1, 2, 3])
    both = classifier_reward(pipe64, TemperatureScaled(on_img, 0.5), on="images")
    li = on_img(decode_latents(pipe64, z))
    assert torch.allclose(both(z, y2), torch.log_softmax(li / 0.5, -1)[torch.arange(5), y2], rtol=1e-12, atol=1e-12)

    with pytest.raises(ValueError, match="cond"):
        r(z, torch.tensor([0, 1, 3, 1, 0]))
    with pytest.raises(ValueError, match="temperature"):
        classifier_reward(pipe64, on_lat, temperature=[0.0])
    with pytest.raises(ValueError, match="on"):
        classifier_reward(pipe64, on_lat, on="pixels")


def test_classifier_reward_on_theory_classifier_mlp(pipe64):
    """A calibrated theory.classifiers.ClassifierMLP (its own temperature) is used as it is."""
    from theory.classifiers import ClassifierMLP

    clf = ClassifierMLP(4 * 8 * 8, 3).double()
    clf.temperature.fill_(2.0)
    r = classifier_reward(pipe64, nn.Sequential(nn.Flatten(), clf), on="latents")
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    y = torch.tensor([2, 0])
    assert torch.allclose(r(z, y), clf.log_lik(z.flatten(1), y), rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------------------- registry

def test_registry_builds_every_parameter_free_reward(pipe64):
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for name in ("colourfulness", "brightness", "jpeg-size", "compressibility", "incompressibility",
                 "diff-compressibility", "diff-incompressibility"):
        r = make_reward(pipe64, name)
        assert r(z).shape == (2,)
        assert r.differentiable == (name not in ("jpeg-size", "compressibility", "incompressibility"))
    assert torch.equal(make_reward(pipe64, "compressibility")(z), -make_reward(pipe64, "jpeg-size")(z))
    assert set(IMAGE_REWARDS) <= set(reward_names())
    assert {"aesthetic", "pickscore", "clip-score", "classifier"} <= set(reward_names())


def test_registry_unknown_name_lists_the_known_ones(pipe64):
    with pytest.raises(ValueError, match="unknown reward 'hpsv2'.*aesthetic.*diff-compressibility"):
        make_reward(pipe64, "hpsv2")
    with pytest.raises(ValueError, match="bad arguments for 'diff-compressibility'"):
        make_reward(pipe64, "diff-compressibility", qualty=10)
    with pytest.raises(FileNotFoundError, match="clip_path"):
        make_reward(pipe64, "aesthetic", clip_path="/nonexistent/clip", head_path="/nonexistent/head.pth")


def test_jpeg_rank_correlation_is_spearman():
    """The helper's number is scipy's Spearman rho of (surrogate, true size), and lies in [-1, 1]."""
    from scipy.stats import spearmanr

    x = _grid_images(12, 16, 16, seed=3)
    x = x * torch.linspace(0.1, 1.0, 12, dtype=torch.float64).view(-1, 1, 1, 1)  # varied contrast
    rho = jpeg_rank_correlation(x, quality=25)
    ref = spearmanr(JpegRoundTrip(25, True)(x).numpy(), jpeg_size_kb(x).numpy()).statistic
    assert rho == pytest.approx(ref) and -1.0 <= rho <= 1.0 and not math.isnan(rho)
