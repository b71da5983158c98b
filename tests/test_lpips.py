"""LPIPS (models/lpips.py) against the lpips package's forward on the same random weights, which go
through scripts/convert_lpips.py (torch .pth files -> one safetensors) and load_lpips; hand checks
(d(x, x) == 0, symmetry, batching, jit); clear errors for bad weight files.

The reference. torchvision does not import beside this torch, and lpips imports torchvision.models
at import time, for ``tv.alexnet(...).features`` / ``tv.vgg16(...).features`` only. We stub that
module with ``torchvision.models.alexnet``/``vgg16`` rebuilt layer for layer from torchvision's
source (AlexNet.features; VGG16 = make_layers(cfgs['D'])), then run the real ``lpips.LPIPS``
when the lpips package is importable (``pip install --no-deps lpips``: it needs scipy and tqdm,
already here). Where it is not, the reference is ``LpipsReplica`` below: lpips 0.1.4's
ScalingLayer, slices, normalize_tensor, NetLinLayer and spatial_average copied line for line;
``test_replica_is_lpips`` checks that it gives bitwise lpips' numbers whenever lpips is there.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from click.testing import CliRunner
from flax import nnx
from PIL import Image

from cli_checks import one_line_error
from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.convert import write_safetensors
from dreambooth_jax.models.lpips import Identity, checkpoint_shapes, load_lpips, lpips_distance

torch = pytest.importorskip("torch")
nn = torch.nn

ROOT = Path(__file__).resolve().parents[1]
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
SIZE = 64  # px: AlexNet's relu5 map is 3x3 there, VGG's 4x4; enough for every layer to matter

# Parity bound. Both sides compute in float32 (XLA at 'highest' precision, the model's default)
# and differ only in the order of their sums: the convs (up to 3*3*512 = 4608 products), channel
# norms, the heads' sums over channels, the spatial means. Each addition rounds by at most
# eps = 2**-24 ~ 6e-8 relative; the errors of one feature map grow like sqrt(terms) * eps ~ 4e-6
# at worst per layer and compound over <= 13 layers, but d is a mean over thousands of such
# elements whose rounding errors are independent, so they mostly cancel: measured <= 3e-7
# relative (a few ulps of d) on every pair below, alex and vgg. We allow 1e-5 (~80 ulps): 30x the
# measured error, and still 6x below the smallest change a real mistake makes here (a conv kernel
# stored with H and W swapped in the last AlexNet conv: 6.5e-5; see test_parity_is_sensitive).
RTOL = 1e-5


# ----------------------------------------------------------------------------- the torch side
def torchvision_features(net: str) -> nn.Sequential:
    """torchvision 0.29's ``alexnet().features`` / ``vgg16().features``, layer for layer."""
    if net == "alex":
        return nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2))
    layers, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


class _TorchvisionNet(nn.Module):
    def __init__(self, net: str):
        super().__init__()
        self.features = torchvision_features(net)
        # a small stand-in for the classifier that torchvision's files hold (the converter drops it)
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(4, 2))


def _stub_torchvision_models(made: list) -> types.ModuleType:
    stub = types.ModuleType("torchvision.models")

    def factory(net):
        def build(pretrained=False, **_):
            assert not pretrained, "the test never asks lpips for downloaded weights"
            made.append(_TorchvisionNet(net))
            return made[-1]
        return build

    stub.alexnet, stub.vgg16 = factory("alex"), factory("vgg")
    return stub


def import_lpips(monkeypatch, made: list):
    """The real lpips package with torchvision.models stubbed, or None if it is not installed."""
    if importlib.util.find_spec("lpips") is None:
        return None
    stub = _stub_torchvision_models(made)
    if "lpips" not in sys.modules:
        tv = types.ModuleType("torchvision")
        tv.models = stub
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.models", stub)
    import lpips

    monkeypatch.setattr(lpips.pretrained_networks, "tv", stub)
    return lpips


SLICES = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}
CHNS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


class LpipsReplica(nn.Module):
    """lpips 0.1.4 ``LPIPS(pretrained=False, net=net)`` in eval mode, its forward copied line for
    line (for when the lpips package is not installed)."""

    def __init__(self, features: nn.Sequential, net: str):
        super().__init__()
        self.register_buffer("shift", torch.Tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.Tensor([.458, .448, .450])[None, :, None, None])
        bounds = (0,) + SLICES[net]
        self.slices = nn.ModuleList(nn.Sequential(*[features[i] for i in range(a, b)])
                                    for a, b in zip(bounds, bounds[1:]))
        for k, c in enumerate(CHNS[net]):  # NetLinLayer(chn, use_dropout=True)
            setattr(self, f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, 1, 0, bias=False))
        self.eval()

    def forward(self, in0, in1):
        h0, h1 = (in0 - self.shift) / self.scale, (in1 - self.shift) / self.scale
        val = 0
        for k, s in enumerate(self.slices):
            h0, h1 = s(h0), s(h1)
            f0 = h0 / (torch.sqrt(torch.sum(h0 ** 2, dim=1, keepdim=True)) + 1e-10)
            f1 = h1 / (torch.sqrt(torch.sum(h1 ** 2, dim=1, keepdim=True)) + 1e-10)
            val += getattr(self, f"lin{k}").model((f0 - f1) ** 2).mean([2, 3], keepdim=True)
        return val


def reference(net: str, monkeypatch, seed: int = 0):
    """(forward (N,3,H,W) x2 -> (N,), torchvision state dict, lpips heads state dict, which)."""
    torch.manual_seed(seed)
    made = []
    lpips = import_lpips(monkeypatch, made)
    if lpips is not None:
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False).eval()
        which = "lpips package"
    else:
        made.append(_TorchvisionNet(net))
        model = LpipsReplica(made[-1].features, net)
        which = "replica"
    with torch.no_grad():
        for k in range(5):  # lpips' trained heads are >= 0 (clamped in training): so are these
            w = getattr(model, f"lin{k}").model[1].weight
            w.copy_(torch.rand(w.shape) * 2 / w.shape[1] ** 0.5)
    backbone = made[-1].state_dict()  # features.* + classifier.*, as torchvision's files
    # what lpips' .pth files hold (its state dict also has the same tensors under lins.{k})
    heads = {k: v for k, v in model.state_dict().items() if re.match(r"lin\d\.", k)}

    def forward(a, b):
        with torch.no_grad():
            return model(torch.from_numpy(nchw(a)), torch.from_numpy(nchw(b))).reshape(-1).numpy()

    return forward, backbone, heads, which


def nchw(a):
    return np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2))


def convert_script():
    """scripts/convert_lpips.py as a module (it puts the repo root on sys.path: undone here)."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("convert_lpips", ROOT / "scripts" / "convert_lpips.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod


def save_torch_files(tmp_path: Path, net: str, backbone, heads) -> tuple[Path, Path]:
    heads_path, backbone_path = tmp_path / f"{net}.pth", tmp_path / BACKBONE_FILES[net]
    torch.save(heads, heads_path)
    torch.save(backbone, backbone_path)
    return heads_path, backbone_path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """net -> (our model loaded from the converted file, torch forward, file, which reference)."""
    cache, conv = {}, convert_script()

    def get(net):
        if net not in cache:
            mp = pytest.MonkeyPatch()
            try:
                forward, backbone, heads, which = reference(net, mp)
            finally:
                mp.undo()
            folder = tmp_path_factory.mktemp(f"lpips_{net}")
            out = conv.convert_lpips(*save_torch_files(folder, net, backbone, heads), folder / "lpips.safetensors", net)
            cache[net] = (load_lpips(out, net=net), forward, out, which)
        return cache[net]

    return get


def photos(n: int, tmp_path_factory) -> np.ndarray:
    """n DreamBooth subject photos (two subjects; photo-like synthetic ones where ../shared is not
    beside the checkout), resized to SIZE px, in [-1, 1] (N, H, W, 3)."""
    from test_data_images import subject_photos

    tmp = tmp_path_factory.mktemp("photos")
    files = subject_photos(tmp, "dog")[:n // 2] + subject_photos(tmp, "cat")[:n - n // 2]
    ims = [np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC), np.float32) for f in files]
    return np.stack(ims) / 127.5 - 1


def rand_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_parity(net, converted, tmp_path_factory):
    """Same weights, same pairs: our distances equal lpips' within RTOL (measured on CPU, max rel
    err: alex 1.7e-7 random / 2.7e-7 photos / 8.6e-8 photo vs noisy copy; vgg 9.9e-8 / 7.8e-8 / 0)."""
    model, forward, _, which = converted(net)
    x = photos(4, tmp_path_factory)
    cases = {"random": (rand_images(3, 1), rand_images(3, 2)),
             "photos": (x, x[[1, 2, 3, 0]]),  # dog-dog, dog-cat, cat-cat, cat-dog
             "photo vs noisy copy": (x[:2], np.clip(x[:2] + rand_images(2, 3) * 0.1, -1, 1))}
    for name, (a, b) in cases.items():
        ours, ref = lpips_distance(model, a, b), forward(a, b)
        assert ours.shape == (len(a),) and ours.dtype == np.float32
        rel = np.abs(ours - ref) / np.abs(ref)
        print(f"{net} {name} vs {which}: d {np.round(ref, 4)} max rel err {rel.max():.2e}")
        assert rel.max() < RTOL, (name, ours, ref)


def test_parity_is_sensitive(converted, tmp_path_factory):
    """RTOL catches real mistakes, even with random weights (whose normalized features react less
    than trained ones): any conv kernel with H and W swapped, or the last ReLU left out."""
    model, forward, _, _ = converted("alex")
    x = photos(4, tmp_path_factory)
    a, b = np.concatenate([rand_images(2, 4), x]), np.concatenate([rand_images(2, 5), x[[1, 2, 3, 0]]])
    ref = forward(a, b)
    mistakes = {}
    for i in (0, 3, 6, 8, 10):
        broken = nnx.clone(model)
        kernel = broken.features[i].kernel
        kernel.set_value(jax.numpy.swapaxes(kernel.get_value(), 0, 1))
        mistakes[f"conv {i} HW-swapped"] = broken
    broken = nnx.clone(model)
    broken.features[11] = Identity()
    mistakes["no last ReLU"] = broken
    for name, broken in mistakes.items():
        assert (np.abs(lpips_distance(broken, a, b) - ref) / ref).max() > 3 * RTOL, name
    assert (np.abs(lpips_distance(model, a, b) - ref) / ref).max() < RTOL  # the clones left it intact


def test_replica_is_lpips(monkeypatch):
    """The fallback reference gives lpips' own numbers, bitwise (skipped without lpips)."""
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("lpips is not installed (pip install --no-deps lpips)")  # justified: make setup installs it
    forward, backbone, heads, which = reference("alex", monkeypatch)
    assert which == "lpips package"
    feats = torchvision_features("alex")
    feats.load_state_dict({k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")})
    replica = LpipsReplica(feats, "alex")
    assert not replica.load_state_dict(heads, strict=False).unexpected_keys
    a, b = rand_images(2, 6), rand_images(2, 7)
    with torch.no_grad():
        mine = replica(torch.from_numpy(nchw(a)), torch.from_numpy(nchw(b))).reshape(-1).numpy()
    np.testing.assert_array_equal(mine, forward(a, b))


def test_shipped_heads_convert(tmp_path, monkeypatch):
    """The lpips package's own alex.pth converts and loads (skipped without lpips)."""
    conv = convert_script()
    heads = conv.default_heads("alex")
    if heads is None or not heads.is_file():
        pytest.skip("lpips is not installed (pip install --no-deps lpips)")  # justified: make setup installs it
    torch.manual_seed(0)
    backbone_path = tmp_path / BACKBONE_FILES["alex"]
    torch.save(_TorchvisionNet("alex").state_dict(), backbone_path)
    model = load_lpips(conv.convert_lpips(heads, backbone_path, tmp_path / "a.safetensors"))
    want = torch.load(heads, map_location="cpu", weights_only=True)["lin3.model.1.weight"].numpy()[0, :, 0, 0]
    np.testing.assert_array_equal(np.asarray(model.lin3.model[1].kernel.get_value())[0, 0, :, 0], want)


# ----------------------------------------------------------------------------- hand checks
def test_hand_checks(converted, tmp_path_factory):
    model, _, path, _ = converted("alex")
    x, y = rand_images(3, 8), photos(3, tmp_path_factory)
    # identical images: exactly 0, jitted (padded batch) and eager
    assert np.all(lpips_distance(model, x, x) == 0)
    assert np.all(np.asarray(model(jax.numpy.asarray(y), jax.numpy.asarray(y))) == 0)
    # symmetric, exactly: both images go through one compiled body (model.__call__'s lax.map)
    d_xy, d_yx = lpips_distance(model, x, y), lpips_distance(model, y, x)
    np.testing.assert_array_equal(d_xy, d_yx)
    assert np.all(d_xy > 0)
    # a batch of pairs == one call per pair (batch size changes only the conv's blocking)
    single = np.concatenate([lpips_distance(model, x[i:i + 1], y[i:i + 1], batch_size=1) for i in range(3)])
    np.testing.assert_allclose(d_xy, single, rtol=1e-5)
    # nnx.jit of the module, per-layer distances sum to the total, embed + distance_between agree
    per = nnx.jit(lambda m, a, b: m(a, b, per_layer=True))(model, x, y)
    assert per.shape == (3, 5)
    np.testing.assert_allclose(np.asarray(per).sum(-1), d_xy, rtol=1e-5)
    emb = jax.jit(lambda g, s, a: nnx.merge(g, s).embed(a), static_argnums=0)
    g, s = nnx.split(model)
    np.testing.assert_allclose(np.asarray(model.distance_between(emb(g, s, x), emb(g, s, y))), d_xy, rtol=1e-5)
    # lpips' normalize=True: inputs in [0, 1]
    np.testing.assert_allclose(np.asarray(model((x + 1) / 2, (y + 1) / 2, normalize=True)), d_xy, rtol=1e-5)


def test_input_errors(converted):
    model, _, _, _ = converted("alex")
    with pytest.raises(ValueError, match="one shape"):
        model(rand_images(1, 0), rand_images(2, 0))
    with pytest.raises(ValueError, match="too small"):
        model(np.zeros((1, 16, 16, 3), np.float32), np.zeros((1, 16, 16, 3), np.float32))


# ----------------------------------------------------------------------------- bad files
def test_load_errors(converted, tmp_path):
    _, _, good, _ = converted("alex")
    with pytest.raises(ConfigError, match=str(tmp_path / "nope.safetensors")):
        load_lpips(tmp_path / "nope.safetensors")
    other = tmp_path / "vae.safetensors"  # another model's weights: no LPIPS metadata
    write_safetensors(other, {"encoder.conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)})
    with pytest.raises(ConfigError, match=f"{other} is not an LPIPS weights file"):
        load_lpips(other)
    with pytest.raises(ConfigError, match=rf"{good} holds LPIPS 'alex' weights, but 'vgg'"):
        load_lpips(good, net="vgg")
    with pytest.raises(ConfigError, match="unknown LPIPS network 'squeeze'"):
        load_lpips(good, net="squeeze")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=str(damaged)):
        load_lpips(damaged)
    # LPIPS metadata, tensors of another net: the loader lists what does not fit
    shapes = checkpoint_shapes("vgg")
    fake = tmp_path / "fake.safetensors"
    write_safetensors(fake, {k: np.zeros(v, np.float32) for k, v in shapes.items()}, {"lpips_net": "alex"})
    with pytest.raises(ConfigError, match=str(fake)):
        load_lpips(fake)


class NotATensor:  # module-level so that torch.save can pickle it; weights_only loading refuses it
    pass


def test_convert_errors(tmp_path, monkeypatch):
    conv = convert_script()
    out = tmp_path / "out.safetensors"
    _, backbone, heads, _ = reference("alex", monkeypatch)
    heads_path, backbone_path = save_torch_files(tmp_path, "alex", backbone, heads)
    missing = tmp_path / "missing.pth"
    with pytest.raises(ConfigError, match=f"heads file {missing} does not exist"):
        conv.convert_lpips(missing, backbone_path, out, "alex")
    with pytest.raises(ConfigError, match=f"backbone file {missing} does not exist"):
        conv.convert_lpips(heads_path, missing, out, "alex")
    # the files swapped: neither holds what its option names
    with pytest.raises(ConfigError, match=f"{backbone_path} has no lin0.model.1.weight"):
        conv.convert_lpips(backbone_path, backbone_path, out, "alex")
    # alex files for --net vgg: the message names the file and the net they fit
    with pytest.raises(ConfigError, match=rf"{backbone_path} is not torchvision's vgg16-397923af.pth.*fit 'alex'"):
        conv.convert_lpips(heads_path, backbone_path, out, "vgg")
    vgg_heads = tmp_path / "vgg_heads.pth"
    torch.save({f"lin{k}.model.1.weight": torch.ones(1, c, 1, 1) for k, c in enumerate(CHNS["vgg"])}, vgg_heads)
    with pytest.raises(ConfigError, match=rf"{vgg_heads} does not hold 'alex' heads.*fit 'vgg'"):
        conv.convert_lpips(vgg_heads, backbone_path, out, "alex")
    with pytest.raises(ConfigError, match="unknown LPIPS network 'squeeze'"):
        conv.convert_lpips(heads_path, backbone_path, out, "squeeze")
    pickled = tmp_path / "code.pth"  # an object that only a full unpickler would build
    torch.save({"lin0.model.1.weight": NotATensor()}, pickled)
    with pytest.raises(ConfigError, match=f"{pickled} is not a PyTorch state dict that loads with weights_only"):
        conv.convert_lpips(pickled, backbone_path, out, "alex")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=str(junk)):
        conv.convert_lpips(heads_path, junk, out, "alex")
    assert not out.exists()
    # the CLI: a one-line error naming the file; then a good run
    r = CliRunner().invoke(conv.main, ["--heads", str(missing), "--backbone", str(backbone_path), "--out", str(out)])
    assert str(missing) in one_line_error(r)
    r = CliRunner().invoke(conv.main, ["--heads", str(heads_path), "--backbone", str(backbone_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert load_lpips(out).net == "alex"
