"""DeepFloyd IF's UNets (stage I, and stage II's super-resolution UNet) as our UNet2DConditionModel:
tiny random checkpoints saved by diffusers compute what diffusers computes and export back, and the
IF-I-XL / IF-II-L configs build (abstractly) with diffusers' parameter names and shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models import ModelOptions, UNet2DConditionModel, UNetConfig, save_component
from dreambooth_jax.models.convert import _to_torch_layout, flax_path_to_torch
from dreambooth_jax.models.loading import load_unet
from dreambooth_jax.testing.real_configs import IF_UNETS as REAL
from dreambooth_jax.testing.reference import UNETS, _perturb, max_rel_err

# Max |ours - diffusers| relative to max |diffusers output|. Both sides evaluate the same float32
# formulas; they differ only in rounding: summation order inside every conv / matmul (XLA vs
# oneDNN/MKL blocking) and the libm erf / exp / rsqrt (<= 4 ulp, tests/numerics.py). A length-K
# float32 inner product errs by about sqrt(K) * 2**-24 relative to sum |a_i b_i| (the probabilistic
# bound of Higham & Mary 2019; the worst case K * 2**-24 is never approached by independent
# roundings): K <= 9 * 128 (the up blocks' 3x3 convs over concatenated skips) gives ~2e-6 per
# layer. The ~20 layers between input and output renormalise (group norms), so their independent
# errors add in quadrature, ~sqrt(20) * 2e-6 ~ 1e-5. Measured: 1.4e-6 - 1.9e-6.
FP32_TOL = 1e-5

_IF_I = dict(sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
             up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
             mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=8, cross_attention_dim=32,
             encoder_hid_dim=24, encoder_hid_dim_type="text_proj", norm_num_groups=8, act_fn="gelu",
             addition_embed_type="text", addition_embed_type_num_heads=4, resnet_time_scale_shift="scale_shift",
             resnet_skip_time_act=True, time_embedding_act_fn="gelu", cross_attention_norm="group_norm")
# stage II: the noise level as class labels, a wider time embedding, and the 1/0.7071 output scales
# diffusers' scripts/convert_if.py gives the super-resolution UNets
_IF_II = dict(_IF_I, in_channels=6, class_embed_type="timestep", time_embedding_dim=48,
              resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071)
TINY = {
    "IF-I": _IF_I,
    "IF-II": _IF_II,
    # diffusers fails on an encoder mask with only_cross_attention (its mask is padded for the
    # image tokens' keys, which this attention lacks), so this one runs without a mask
    "IF-II-cross-only": dict(_IF_II, only_cross_attention=True),
    "SD-mask": dict(UNETS["sd1"], in_channels=4),  # the encoder mask in SD's transformer blocks too
}
TEXT_LEN = 7  # differs from every attention resolution's token count, as diffusers' mask padding needs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (folder saved by diffusers, inputs, diffusers' output, diffusers' output unmasked)."""
    from diffusers import UNet2DConditionModel as TorchUNet

    cache = {}

    def get(name):
        if name in cache:
            return cache[name]
        cfg = TINY[name]
        torch.manual_seed(0)
        unet = TorchUNet(**cfg).eval()
        _perturb(unet, 1, 0.02)  # nothing left at its zero / one initialisation
        folder = tmp_path_factory.mktemp(name) / "unet"
        unet.save_pretrained(folder)
        rng = np.random.RandomState(0)
        width = cfg.get("encoder_hid_dim") or cfg["cross_attention_dim"]
        inputs = dict(x=rng.randn(2, cfg["in_channels"], 16, 16).astype(np.float32), t=np.array([3, 777]),
                      ctx=rng.randn(2, TEXT_LEN, width).astype(np.float32),
                      labels=np.array([20, 250]) if cfg.get("class_embed_type") else None,
                      mask=None if "cross-only" in name else np.array([[1] * TEXT_LEN, [1] * 4 + [0] * 3]))
        cache[name] = (folder, inputs, _torch_forward(unet, inputs), _torch_forward(unet, dict(inputs, mask=None)))
        return cache[name]

    return get


def _torch_forward(unet, r):
    opt = lambda a: None if a is None else torch.from_numpy(a)
    with torch.no_grad():
        return unet(torch.from_numpy(r["x"]), torch.from_numpy(r["t"]), torch.from_numpy(r["ctx"]),
                    class_labels=opt(r["labels"]), encoder_attention_mask=opt(r["mask"])).sample.numpy()


def _ours(unet, r):
    out = unet(jnp.asarray(r["x"].transpose(0, 2, 3, 1)), jnp.asarray(r["t"]), jnp.asarray(r["ctx"]),
               class_labels=r["labels"], encoder_attention_mask=r["mask"])
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name", list(TINY))
def test_matches_diffusers(name, tiny):
    folder, r, ref, ref_unmasked = tiny(name)
    err = max_rel_err(_ours(load_unet(folder), r), ref)
    print(name, err)
    assert err <= FP32_TOL, err
    if r["mask"] is not None:  # the padded tokens change the output: the mask was tested
        assert max_rel_err(ref_unmasked, ref) > 100 * FP32_TOL


def test_export_reloads_in_diffusers(tiny, tmp_path):
    from diffusers import UNet2DConditionModel as TorchUNet

    folder, r, ref, _ = tiny("IF-II")
    save_component(load_unet(folder), tmp_path / "unet")
    again = TorchUNet.from_pretrained(tmp_path / "unet").eval()
    assert np.array_equal(_torch_forward(again, r), ref)  # same weights, same config: same bits


# unet/config.json of DeepFloyd/IF-I-XL-v1.0 and IF-II-L-v1.0 (as written down from the published
# files, not downloaded: no hub here). Both give diffusers' own parameter counts below, which are
# not the published model sizes (IF-I-XL "4.3B", IF-II-L "1.2B"), and diffusers' IF conversion
# script gives super-resolution UNets resnet_out_scale_factor = mid_block_scale_factor = 1/0.7071:
# check against the real files when a hub is reachable.
PARAMS = {"IF-I-XL-v1.0": 2_454_386_182, "IF-II-L-v1.0": 1_325_544_966}  # diffusers' count of these configs


@pytest.mark.slow  # 6-14 s each (abstract builds of 1.3-2.5 B parameters); make test-all runs them
@pytest.mark.parametrize("name", list(REAL))
def test_real_configs_build_with_diffusers_parameters(name):
    from diffusers import UNet2DConditionModel as TorchUNet

    cfg = UNetConfig.from_diffusers(REAL[name])
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    zeros = lambda shape: np.broadcast_to(np.int8(0), shape)  # a shape to re-lay out, no memory
    ours = {flax_path_to_torch(p): _to_torch_layout(zeros(v.shape), str(p[-1])).shape
            for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    with torch.device("meta"):  # diffusers' model without memory either
        theirs = {k: tuple(v.shape) for k, v in TorchUNet(**REAL[name]).state_dict().items()}
    assert ours == theirs
    assert sum(int(np.prod(s)) for s in ours.values()) == PARAMS[name]


@pytest.mark.parametrize("key,value", [
    ("resnet_time_scale_shift", "spatial"), ("addition_embed_type", "image"), ("class_embed_type", "projection"),
    ("encoder_hid_dim_type", "image_proj"), ("cross_attention_norm", "layer_norm"), ("act_fn", "mish"),
    ("mid_block_type", "UNetMidBlock2D"), ("time_embedding_type", "fourier"),
    ("down_block_types", ["KDownBlock2D"] * 4),
])
def test_unsupported_values_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=key) as e:
        UNetConfig.from_diffusers(dict(REAL["IF-I-XL-v1.0"], **{key: value}), "if/unet/config.json")
    assert "if/unet/config.json" in str(e.value)


def test_lora_and_remat_reach_the_if_layers(tiny):
    """Adapters attach to the added-KV projections, and remat leaves the gradients as they were."""
    from dreambooth_jax.models.lora import LoRAParam, LoRASpec, add_lora

    folder, r, _, _ = tiny("IF-II")
    x, ctx = jnp.asarray(r["x"].transpose(0, 2, 3, 1)), jnp.asarray(r["ctx"])
    grads = []
    for remat in (False, True):
        unet = load_unet(folder, ModelOptions(remat=remat))
        names = add_lora(unet, LoRASpec(rank=2, targets=("add_k_proj", "add_v_proj", "to_q")))
        assert "down_blocks.1.attentions.0.add_k_proj" in names and "mid_block.attentions.0.to_q" in names
        g, lora, rest = nnx.split(unet, LoRAParam, ...)
        # the frozen part's Variables rebuilt inside jax.grad, as the train step does (training/step.py)
        loss = lambda lo, re: nnx.merge(g, lo, jax.tree.map(lambda a: a, re))(x, 10, ctx,
                                                                             class_labels=r["labels"]).sum()
        grad = jax.jit(jax.grad(loss))(lora, rest)
        grads.append(np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(grad)]))
    assert np.abs(grads[0]).max() > 0
    assert max_rel_err(grads[1], grads[0]) <= 1e-5
