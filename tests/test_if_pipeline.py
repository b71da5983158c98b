"""DeepFloyd IF's two stages end to end vs diffusers' IFPipeline / IFSuperResolutionPipeline.

Tiny random IF stages (the UNets of tests/test_unet_if.py, a tiny T5 as tests/test_t5.py builds it,
IF's scheduler configs from tests/test_samplers_if.py) are saved by diffusers in IF's folder layout,
loaded by ``load_if`` and sampled whole by both sides from the same noise: our x_T, stage II's
augmentation noise and every ancestral step's noise are what diffusers' ``randn_tensor`` returns
(in the pipeline's module and in DDPMScheduler.step), in the order diffusers draws them.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers.pipelines.deepfloyd_if import pipeline_if, pipeline_if_superresolution
from diffusers.schedulers import scheduling_ddpm

from dreambooth_jax.diffusion.if_pipeline import IFStageI, IFStageII, encode, upsample_bilinear
from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.if_loading import load_if
from dreambooth_jax.sharding import make_mesh
from dreambooth_jax.testing.reference import _perturb, max_rel_err
from test_samplers import _nchw
from test_samplers_if import IF_I, IF_II
from test_t5 import FP32_REL_TOL as T5_TOL, _randomize, _tiny_config
from test_unet_if import TINY

PROMPTS = ["a photo of a sks dog", "the lazy fox on a chair"]
STEPS, LOW, HIGH = 4, 16, 32
# Final samples, max |ours - diffusers| / max |diffusers|. Both sides run the same float32 formulas
# and differ by rounding only: one UNet forward errs by ~2e-6 relative (tests/test_unet_if.py,
# measured 1.4e-6 - 1.9e-6), T5's embeddings by < 1e-5 (tests/test_t5.py). Guidance g amplifies
# the branches' errors by up to 1 + 2g (15 at g = 7), and each DDPM step maps the guided epsilon
# to x0 with a factor sqrt(1 - abar) / sqrt(abar) of up to ~2.4 at IF-I's first step here (t = 750 of
# the cosine schedule); dynamic thresholding and the learned variance's noise scale are Lipschitz
# in their inputs. So ~1e-4 per step at most, and 4 steps stay below 5e-4, tests/test_pipeline.py's
# bound for SD's whole pipelines. Measured (this CPU; ATEN_CPU_CAPABILITY=default with XLA at SSE4.2;
# XLA -O0): stage I 1.0e-4, 1.2e-4, 7.2e-5; stage II 3.5e-5, 3.4e-5, 4.2e-5.
E2E_TOL = 5e-4


# ----------------------------------------------------------------------------- fixtures
def _t5_tokenizer() -> transformers.T5Tokenizer:
    """A T5 tokenizer from a vocabulary list (tokenizer.json, no sentencepiece), ids < the tiny T5's 100."""
    pieces = ["▁a", "▁photo", "▁of", "▁sks", "▁dog", "▁the", "▁lazy", "▁fox", "▁on", "▁chair", "▁"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - i) for i, p in enumerate(pieces)]
    return transformers.T5Tokenizer(vocab=vocab + [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz"])


@pytest.fixture(scope="module")
def if_stages(tmp_path_factory):
    """{'I' | 'II': (folder, the diffusers pipeline saved there)}. Stage II names no text encoder
    nor tokenizer, as IF-II is usually saved (loaded with text_encoder=None)."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel

    def unet(name):
        torch.manual_seed(0)
        model = UNet2DConditionModel(**TINY[name]).eval()
        _perturb(model, 1, 0.02)
        return model

    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    t5 = _randomize(transformers.T5EncoderModel(_tiny_config(d_model=TINY["IF-I"]["encoder_hid_dim"])), 0)
    stage1 = IFPipeline(tokenizer=_t5_tokenizer(), text_encoder=t5, unet=unet("IF-I"),
                        scheduler=DDPMScheduler.from_config(IF_I), **none)
    stage2 = IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=unet("IF-II"),
                                       scheduler=DDPMScheduler.from_config(IF_II),
                                       image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
                                       **none)
    root = tmp_path_factory.mktemp("if")
    out = {}
    for kind, pipe in (("I", stage1), ("II", stage2)):
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(root / kind)
        out[kind] = (root / kind, pipe)
    return out


def _draws(monkeypatch, module, draws: list[np.ndarray]):
    """diffusers' randn_tensor in the pipeline ``module`` and in DDPMScheduler.step returns ``draws``
    (NHWC) in order; returns the queue, empty once diffusers has drawn them all."""
    queue = [_nchw(d) for d in draws]

    def fake(shape, **kwargs):
        assert queue, "diffusers drew more noise than given"
        out = queue.pop(0)
        assert tuple(out.shape) == tuple(shape), (tuple(out.shape), tuple(shape))
        return out

    monkeypatch.setattr(module, "randn_tensor", fake)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fake)
    return queue


def _step_draws(stage, step_noise: np.ndarray) -> list[np.ndarray]:
    """The ancestral noises diffusers' DDPMScheduler.step draws: one per step with t > 0."""
    return [step_noise[i] for i, t in enumerate(np.asarray(stage.sampler.timesteps)) if t > 0]


def _to_uint8(x0_nchw: torch.Tensor) -> np.ndarray:
    """diffusers' output conversion ((x / 2 + 0.5).clamp(0, 1), numpy_to_pil's round) as NHWC uint8."""
    return ((x0_nchw / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _check(ours, ref_nchw: torch.Tensor, what: str) -> float:
    ref = ref_nchw.permute(0, 2, 3, 1).numpy()
    err = max_rel_err(ours.x0, ref)
    assert err <= E2E_TOL, (what, err)
    assert ours.images.dtype == np.uint8 and ours.images.shape == ref.shape
    assert np.abs(ours.images.astype(int) - _to_uint8(ref_nchw)).max() <= 1  # at most one rounding step
    return err


# ----------------------------------------------------------------------------- parity
def test_stage_one_matches_diffusers(if_stages, monkeypatch):
    folder, ref_pipe = if_stages["I"]
    pipe = load_if(folder)
    assert pipe.kind == "I" and pipe.text_encoder is not None and pipe.image_noising_scheduler_config is None
    embeds, mask = encode(pipe, PROMPTS)
    ref_embeds, ref_neg = ref_pipe.encode_prompt(PROMPTS, clean_caption=False)
    assert max_rel_err(embeds, ref_embeds.numpy()) <= T5_TOL
    assert max_rel_err(encode(pipe, [""] * 2)[0], ref_neg.numpy()) <= T5_TOL
    assert mask.shape == (2, 77) and mask.sum(1).tolist() == [7, 7]

    stage = IFStageI(pipe, steps=STEPS)
    rng = np.random.RandomState(0)
    noise = rng.randn(2, LOW, LOW, 3).astype(np.float32)
    step_noise = rng.randn(STEPS, 2, LOW, LOW, 3).astype(np.float32)
    ours = stage(embeds, None, height=LOW, width=LOW, guidance=7.0, noise=noise, step_noise=step_noise)  # negative: ""
    queue = _draws(monkeypatch, pipeline_if, [noise] + _step_draws(stage, step_noise))
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, num_inference_steps=STEPS, height=LOW, width=LOW, guidance_scale=7.0,
                       output_type="pt", clean_caption=False).images
    assert not queue
    print("stage I", _check(ours, ref, "stage I"))


def test_stage_two_matches_diffusers(if_stages, monkeypatch):
    folder, ref_pipe = if_stages["II"]
    pipe = load_if(folder)
    assert pipe.kind == "II" and pipe.text_encoder is None and pipe.tokenizer is None
    rng = np.random.RandomState(1)
    embeds, neg = (rng.randn(2, 77, TINY["IF-II"]["encoder_hid_dim"]).astype(np.float32) for _ in range(2))
    low = rng.randint(0, 256, (2, LOW, LOW, 3)).astype(np.uint8)
    noise, aug, *steps = (rng.randn(2, HIGH, HIGH, 3).astype(np.float32) for _ in range(2 + STEPS))
    step_noise = np.stack(steps)
    stage = IFStageII(pipe, steps=STEPS)
    ours = stage(low, embeds, neg, height=HIGH, width=HIGH, guidance=4.0, noise_level=250, noise=noise,
                 aug_noise=aug, step_noise=step_noise)
    queue = _draws(monkeypatch, pipeline_if_superresolution, [noise, aug] + _step_draws(stage, step_noise))
    with torch.no_grad():  # diffusers takes a tensor as given: [-1, 1], as it reads a PIL image
        ref = ref_pipe(image=_nchw(low.astype(np.float32) / np.float32(127.5) - np.float32(1)), height=HIGH,
                       width=HIGH, prompt_embeds=torch.from_numpy(embeds), negative_prompt_embeds=torch.from_numpy(neg),
                       num_inference_steps=STEPS, guidance_scale=4.0, noise_level=250, output_type="pt").images
    assert not queue
    print("stage II", _check(ours, ref, "stage II"))
    # guidance, noise level and the noises are runtime values: one compiled loop
    again = stage(ours.x0[:, ::2, ::2], embeds, neg, height=HIGH, width=HIGH, guidance=1.0, noise_level=20,
                  noise=aug, aug_noise=noise, step_noise=step_noise[::-1])
    assert stage._fn._cache_size() == 1 and not np.array_equal(again.x0, ours.x0)


def test_upsample_matches_torch_interpolate():
    """F.interpolate(bilinear, align_corners=True), integer and fractional ratios. Both sides use the
    same float32 taps (torch's formula); each output is a convex combination of 4 inputs computed with
    ~4 roundings of values <= max |x| on either side (torch: 4 weight products, 4 products, 3 sums;
    ours: 2 x (2 products, 1 sum), FMA-contracted or not), so they differ by < 9 * 2**-24 * max |x|."""
    x = np.random.RandomState(0).randn(2, 5, 7, 3).astype(np.float32)
    for size in ((16, 12), (5, 14), (20, 7), (1, 1)):
        ref = torch.nn.functional.interpolate(_nchw(x), size, mode="bilinear", align_corners=True)
        ours = np.asarray(upsample_bilinear(jax.numpy.asarray(x), *size))
        assert np.abs(ours - ref.permute(0, 2, 3, 1).numpy()).max() <= 9 * 2.0 ** -24 * np.abs(x).max(), size


def test_sharded_equals_single_device(if_stages):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 simulated devices, as make test sets")  # justified: a run without XLA_FLAGS
    pipe = load_if(if_stages["I"][0])
    embeds, _ = encode(pipe, PROMPTS)
    mesh = make_mesh(devices=jax.devices()[:2])
    single = IFStageI(pipe, steps=2)(embeds, None, height=LOW, width=LOW, seed=3)
    sharded = IFStageI(pipe, steps=2, mesh=mesh)(embeds, None, height=LOW, width=LOW, seed=3)
    # same math and noise (drawn from the seed); only XLA's per-device batch changes summation order
    assert max_rel_err(sharded.x0, single.x0) <= 2e-5
    assert np.abs(sharded.images.astype(int) - single.images.astype(int)).max() <= 1


# ----------------------------------------------------------------------------- errors
def test_not_an_if_folder(pipeline_dirs, if_stages, tmp_path):
    sd = pipeline_dirs("sd1")
    with pytest.raises(ConfigError, match=r"model_index\.json: _class_name 'StableDiffusionPipeline' is not a "
                                          r"DeepFloyd IF pipeline.*load_pretrained") as e:
        load_if(sd)
    assert str(sd / "model_index.json") in str(e.value)
    bad = shutil.copytree(if_stages["II"][0], tmp_path / "II")  # stage II without its noising scheduler
    index = json.loads((bad / "model_index.json").read_text())
    without = {k: v for k, v in index.items() if k != "image_noising_scheduler"}
    (bad / "model_index.json").write_text(json.dumps(without))
    with pytest.raises(ConfigError, match="needs 'image_noising_scheduler'"):
        load_if(bad)
    (bad / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(ConfigError, match=r"component 'text_encoder' is \['transformers', 'CLIPTextModel'\]"):
        load_if(bad)


def test_stage_and_input_errors(if_stages):
    one = load_if(if_stages["I"][0], components=("unet", "scheduler"))
    two = load_if(if_stages["II"][0])
    embeds = np.zeros((2, 77, TINY["IF-I"]["encoder_hid_dim"]), np.float32)
    with pytest.raises(ConfigError, match="use IFStageI"):
        IFStageII(one)
    with pytest.raises(ConfigError, match="use IFStageII"):
        IFStageI(two)
    with pytest.raises(ConfigError, match="loaded without a text_encoder and tokenizer"):
        encode(two, PROMPTS)
    stage = IFStageII(two, steps=2)
    low = np.zeros((2, LOW, LOW, 3), np.uint8)
    with pytest.raises(ConfigError, match="pass prompt embeddings"):  # negative None: "" needs T5
        stage(low, embeds, None, height=HIGH, width=HIGH)
    with pytest.raises(ConfigError, match=r"noise_level 1000 outside \[0, 1000\)"):
        stage(low, embeds, embeds, noise_level=1000, height=HIGH, width=HIGH)
    with pytest.raises(ConfigError, match="positive multiple of 2"):
        stage(low, embeds, embeds, height=33, width=HIGH)
    with pytest.raises(ConfigError, match=r"low-res images must be \(N, h, w, 3\) for N = 2"):
        stage(low[:1], embeds, embeds, height=HIGH, width=HIGH)
    with pytest.raises(ConfigError, match="step_noise must be"):
        IFStageI(one, steps=2)(embeds, embeds, height=LOW, width=LOW, step_noise=np.zeros((3, 2, LOW, LOW, 3)))
