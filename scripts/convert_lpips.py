"""Convert LPIPS weights (the lpips package's heads + torchvision's backbone) to one safetensors file.

    python scripts/convert_lpips.py --net alex --out lpips_alex.safetensors
    python scripts/convert_lpips.py --net vgg --heads PATH/vgg.pth --backbone PATH/vgg16-397923af.pth --out F

Run once; ``dreambooth_jax.models.lpips.load_lpips`` then reads the result without unpickling
anything. This script is the only place that reads pickled files, and it does so with
``torch.load(weights_only=True)`` (tensors and plain containers only, no code). Needs torch.

--heads: lpips v0.1 linear heads, ``lpips/weights/v0.1/{alex,vgg}.pth``, shipped inside the
  ``lpips`` pip package (``pip download lpips --no-deps`` and unzip it, if it is not installed);
  default: the installed package's file.
--backbone: torchvision's ImageNet checkpoint as torch's hub cache keeps it
  (``torchvision.models.alexnet(weights="IMAGENET1K_V1")`` downloads it there);
  default: ``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth`` or ``vgg16-397923af.pth``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_jax.errors import ConfigError, user_errors  # noqa: E402
from dreambooth_jax.models.convert import write_safetensors  # noqa: E402
from dreambooth_jax.models.lpips import META_NET, META_VERSION, NETS, VERSION, check_net, checkpoint_shapes  # noqa: E402

BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_HEAD = re.compile(r"^lin(\d+)\.model\.([01])\.weight$")  # model.0 when lpips ran with use_dropout=False


def default_heads(net: str) -> Path | None:
    """The installed lpips package's ``weights/v0.1/{net}.pth`` (found without importing lpips,
    whose import needs torchvision), or None."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / f"v{VERSION}" / f"{net}.pth"


def default_backbone(net: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def _load_state_dict(path: Path, what: str, how_to_get: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist; {how_to_get}")
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, zip errors, "weights only load failed": not a plain state dict
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{what} file {path} is not a PyTorch state dict that loads with "
                          f"weights_only=True: {first}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{what} file {path} does not hold a {{name: tensor}} state dict")
    return {k: v.detach().float().numpy() for k, v in sd.items()}


def _other_net(shapes: dict[str, tuple], prefix: str) -> str:
    """' (they fit lpips 'vgg')' when the given tensors match another network's, else ''."""
    for other in NETS:
        want = {k: v for k, v in checkpoint_shapes(other).items() if k.startswith(prefix)}
        if all(shapes.get(k) == v for k, v in want.items()):
            return f" (they fit '{other}': wrong --net or wrong file?)"
    return ""


def read_heads(path: Path, net: str) -> dict[str, np.ndarray]:
    """lpips' ``lin{k}.model.1.weight`` tensors for ``net`` from its .pth file, checked."""
    sd = _load_state_dict(path, "LPIPS heads", "it ships in the lpips pip package as "
                          f"lpips/weights/v{VERSION}/{net}.pth (pip download lpips --no-deps, then unzip)")
    heads = {}
    for key, t in sd.items():
        m = _HEAD.match(key)
        if m:
            heads[f"lin{m[1]}.model.1.weight"] = t
    want = {k: v for k, v in checkpoint_shapes(net).items() if k.startswith("lin")}
    missing = sorted(set(want) - set(heads))
    if missing:
        raise ConfigError(f"LPIPS heads file {path} has no {', '.join(missing)}; it is not an lpips "
                          f"v{VERSION} weights file (its keys: {', '.join(sorted(sd)[:8])}"
                          f"{' ...' if len(sd) > 8 else ''})")
    extra = sorted(set(heads) - set(want))
    shapes = {k: tuple(v.shape) for k, v in heads.items()}
    wrong = [k for k in want if shapes[k] != want[k]]
    if extra or wrong:
        got = ", ".join(f"{k} {shapes[k]}" for k in wrong + extra)
        raise ConfigError(f"LPIPS heads file {path} does not hold '{net}' heads: {got}; '{net}' has "
                          f"{', '.join(f'{k} {want[k]}' for k in wrong) or f'{len(want)} heads'}"
                          + _other_net(shapes, "lin"))
    return heads


def read_backbone(path: Path, net: str) -> dict[str, np.ndarray]:
    """torchvision's ``features.{i}.weight/bias`` for ``net`` (the classifier is dropped), checked."""
    sd = _load_state_dict(path, "torchvision backbone",
                          f"torchvision saves it as {BACKBONE_FILES[net]} in torch's hub cache "
                          "(~/.cache/torch/hub/checkpoints) when it loads the ImageNet weights")
    want = {k: v for k, v in checkpoint_shapes(net).items() if k.startswith("features.")}
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    used = {k: v for k, v in feats.items() if k in want}
    missing = sorted(set(want) - set(feats))
    wrong = sorted(k for k in used if shapes[k] != want[k])
    # later conv layers than LPIPS uses are fine (none in torchvision's files); anything else under
    # features. (batch-norm statistics of vgg16_bn...) is another architecture
    index = lambda k: int(k.split(".")[1]) if k.split(".")[1].isdigit() else -1
    last = max(index(k) for k in want)
    extra = sorted(k for k in feats if k not in want and index(k) <= last)
    if missing or wrong or extra:
        parts = ([f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"] if missing else []) \
            + [f"{k} is {shapes[k]}, '{net}' needs {want[k]}" for k in wrong[:3]] \
            + ([f"unexpected {', '.join(extra[:6])}"] if extra else [])
        raise ConfigError(f"torchvision backbone file {path} is not torchvision's {BACKBONE_FILES[net]} "
                          f"('{net}'): {'; '.join(parts)}" + _other_net(shapes, "features."))
    return used


def convert_lpips(heads: str | Path, backbone: str | Path, out: str | Path, net: str = "alex") -> Path:
    """Read both files, check them against ``net``, write one safetensors file for ``load_lpips``."""
    check_net(net, "convert_lpips")
    tensors = {**read_backbone(Path(backbone), net), **read_heads(Path(heads), net)}
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in sorted(tensors.items())}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, tensors, metadata={META_NET: net, META_VERSION: VERSION,
                                              "source_heads": Path(heads).name,
                                              "source_backbone": Path(backbone).name})
    return out


@click.command()
@click.option("--net", type=click.Choice(sorted(NETS)), default="alex", show_default=True,
              help="LPIPS backbone: 'alex' (lpips' default, the metric's usual choice) or 'vgg'.")
@click.option("--heads", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="lpips' head file (.pth). Default: the installed lpips package's weights/v0.1/NET.pth.")
@click.option("--backbone", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="torchvision's checkpoint. Default: torch's hub cache checkpoints/alexnet-owt-7be5be79.pth "
                   "or vgg16-397923af.pth.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output .safetensors file.")
@user_errors
def main(net, heads, backbone, out):
    if heads is None:
        heads = default_heads(net)
        if heads is None:
            raise ConfigError("the lpips package is not installed: pass --heads PATH to its "
                              f"weights/v{VERSION}/{net}.pth (pip download lpips --no-deps, then unzip)")
    backbone = backbone if backbone is not None else default_backbone(net)
    path = convert_lpips(heads, backbone, out, net)
    click.echo(f"wrote {path} (LPIPS v{VERSION} '{net}': {heads.name} + {backbone.name})")


if __name__ == "__main__":
    main()
