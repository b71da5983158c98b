"""LoRA files: save our adapters for diffusers / AUTOMATIC1111 / ComfyUI, read theirs, fold them into a model.

Formats (safetensors, PyTorch layouts: linear (out, in), conv OIHW):

* ``diffusers`` (what ``StableDiffusionPipeline.save_lora_weights`` writes for peft adapters):
  ``unet.<module>.lora_A.weight`` (r, in) / (r, cin, kh, kw) and ``.lora_B.weight`` (out, r) /
  (out, r, 1, 1); text encoder ``text_encoder.text_model.<module>...``. We fold ``alpha / rank``
  into ``lora_B``, so the file is right for any loader that assumes alpha = rank (peft's default),
  and write diffusers' ``lora_adapter_metadata`` (a peft ``LoraConfig`` per component, alpha = rank).
* ``kohya`` (kohya sd-scripts, AUTOMATIC1111, ComfyUI): ``lora_unet_<module, '.' -> '_'>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (the real alpha, a scalar); text encoder ``lora_te_text_model_<...>``.

``read_lora`` also reads peft ``adapter_model.safetensors`` files (``base_model.model.`` prefix,
``adapter_config.json`` beside it for alpha) and the older diffusers attention-processor keys
(``...attn1.processor.to_q_lora.down.weight``). Kohya names join the module path with '_', which
is ambiguous on its own: they are resolved against a model's module names (``apply_lora`` does it,
or pass ``module_names`` to ``read_lora``).
"""

from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.errors import CheckpointError, ConfigError
from dreambooth_jax.models.convert import read_safetensors, write_safetensors
from dreambooth_jax.models.lora import adaptable_modules, lora_modules

COMPONENTS = ("unet", "text_encoder")
FORMATS = ("diffusers", "kohya")
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
_SAVE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": "bfloat16"}


class LoRAWeights(NamedTuple):
    """One module's adapter in our layouts: ``delta W = scale * down @ up``.

    down: Linear (in, r) / Conv (kh, kw, cin, r); up: Linear (r, out) / Conv (1, 1, r, out);
    keys: the file's (down, up) tensor names, for error messages."""

    down: np.ndarray
    up: np.ndarray
    scale: float
    keys: tuple[str, str] = ("", "")


# ----------------------------------------------------------------------------- layouts
def _to_torch(a: np.ndarray) -> np.ndarray:
    """Our (in, r) / (kh, kw, cin, r) layout -> PyTorch's (r, in) / (r, cin, kh, kw) (and the same for up)."""
    return a.T if a.ndim == 2 else a.transpose(3, 2, 0, 1)


def _from_torch(t: np.ndarray) -> np.ndarray:
    return t.T if t.ndim == 2 else t.transpose(2, 3, 1, 0)


def _torch_shape(shape: tuple) -> tuple:
    return tuple(reversed(shape)) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])


# ----------------------------------------------------------------------------- save
def save_lora(path: str | Path, adapters_by_component: Mapping[str, nnx.Module], format: str = "diffusers", *,
              overwrite: bool = False, dtype: str = "float32") -> Path:
    """Write the adapters of ``{'unet': model, 'text_encoder': model}`` as one safetensors file.

    format: 'diffusers' (scale folded into lora_B, plus diffusers' adapter metadata) or 'kohya'
    (real alpha in ``.alpha``). dtype: 'float32', 'float16' or 'bfloat16'. Atomic (tmp + rename);
    an existing file is kept unless ``overwrite``."""
    if format not in FORMATS:
        raise ConfigError(f"LoRA format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype not in _SAVE_DTYPES:
        raise ConfigError(f"LoRA dtype must be one of {', '.join(_SAVE_DTYPES)}, got {dtype!r}")
    unknown = [c for c in adapters_by_component if c not in COMPONENTS]
    if unknown:
        raise ConfigError(f"cannot save LoRA adapters of {', '.join(unknown)}: only {', '.join(COMPONENTS)}")
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"LoRA file {path} is a folder; give a file name (e.g. pytorch_lora_weights.safetensors)")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise CheckpointError(f"refusing to overwrite {path} (pass overwrite=True)")
    out_dtype = np.dtype(_SAVE_DTYPES[dtype])
    tensors: dict[str, np.ndarray] = {}
    config: dict[str, object] = {}
    kohya_ranks, kohya_alphas = set(), set()
    for component, model in adapters_by_component.items():
        adapters = lora_modules(model)
        if not adapters:
            continue
        for name, lora in sorted(adapters.items()):
            down = np.asarray(lora.down[...], np.float32)
            up = np.asarray(lora.up[...], np.float32)
            if format == "diffusers":
                base = f"{component}.{'text_model.' if component == 'text_encoder' else ''}{name}"
                tensors[f"{base}.lora_A.weight"] = _to_torch(down).astype(out_dtype)
                tensors[f"{base}.lora_B.weight"] = _to_torch(np.float32(lora.scale) * up).astype(out_dtype)
            else:
                base = _KOHYA_PREFIX[component] + name.replace(".", "_")
                tensors[f"{base}.lora_down.weight"] = _to_torch(down).astype(out_dtype)
                tensors[f"{base}.lora_up.weight"] = _to_torch(up).astype(out_dtype)
                tensors[f"{base}.alpha"] = np.asarray(lora.alpha, np.float32)
                kohya_ranks.add(lora.rank)
                kohya_alphas.add(lora.alpha)
        if format == "diffusers":
            config.update({f"{component}.{k}": v for k, v in _peft_config(adapters).items()})
    if not tensors:
        raise ConfigError(f"no LoRA adapters to save in {', '.join(adapters_by_component) or 'no component'}")
    if format == "diffusers":
        metadata = {METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    else:  # what kohya sd-scripts records (shown by AUTOMATIC1111's LoRA browser)
        metadata = {"ss_network_module": "networks.lora"}
        if len(kohya_ranks) == 1 and len(kohya_alphas) == 1:
            metadata.update(ss_network_dim=str(kohya_ranks.pop()), ss_network_alpha=f"{kohya_alphas.pop():g}")
    try:
        write_safetensors(path, tensors, metadata)
    except OSError as e:
        raise CheckpointError(f"cannot write LoRA file {path}: {e.strerror or e}") from None
    return path


def _peft_config(adapters: Mapping[str, object]) -> dict:
    """peft ``LoraConfig`` kwargs for adapters whose scale is folded into lora_B (alpha = rank).

    Module names are given without transformers' ``text_model.`` prefix: peft matches them as
    suffixes, so they fit both transformers 4 (``text_model.encoder...``) and 5 (``encoder...``)."""
    ranks = {name: int(lora.rank) for name, lora in adapters.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {n: k for n, k in sorted(ranks.items()) if k != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "use_dora": False, "use_rslora": False}


# ----------------------------------------------------------------------------- read
# (pattern on the key after its component prefix, role). Group 'm' is the module name.
_SUFFIXES = [
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.default)?\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.default)?\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.(?:lora|lora_linear_layer)\.down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.(?:lora|lora_linear_layer)\.up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
]
# Old diffusers attention processors: <attn>.processor.to_q_lora.down.weight (UNet) and
# <self_attn>.to_q_lora.down.weight (text encoder).
_PROCESSOR = re.compile(r"^(?P<a>.+?)(?:\.processor)?\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<d>down|up)\.weight$")
_TE_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNSUPPORTED = [(re.compile(p), what) for p, what in (
    (r"lora_magnitude_vector|dora_scale", "DoRA"), (r"\.hada_", "LyCORIS LoHa"), (r"\.lokr_", "LyCORIS LoKr"),
    (r"\.diff(_b)?$", "full-weight difference (LyCORIS 'diff')"),
    (r"\.lora_[AB]\.bias$|\.lora_(up|down)\.bias$", "LoRA bias"),
)]


def _component_of(key: str) -> tuple[str, str]:
    """(component, rest of the key)."""
    for prefix, component in (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                              ("lora_te_", "text_encoder")):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if component.startswith("text_encoder"):
                rest = rest.removeprefix("text_model_")
            return component, rest
    key = key.removeprefix("base_model.model.")
    head, _, rest = key.partition(".")
    if head in ("unet", "text_encoder", "text_encoder_2", "transformer", "prior", "decoder") and rest:
        component = head
    else:  # no component prefix: a peft or old diffusers file of one model
        component, rest = ("text_encoder" if key.startswith(("text_model.", "encoder.layers.")) else "unet"), key
    if component.startswith("text_encoder"):
        rest = rest.removeprefix("text_model.")
    return component, rest


def _parse_key(key: str) -> tuple[str, str, str] | None:
    """(component, module name, 'down' | 'up' | 'alpha') of a LoRA tensor name, or None."""
    component, rest = _component_of(key)
    m = _PROCESSOR.match(rest)
    if m:
        proj = _TE_PROC[m["p"]] if component.startswith("text_encoder") else m["p"].replace("to_out", "to_out.0")
        return component, f"{m['a']}.{proj}", m["d"]
    for pattern, role in _SUFFIXES:
        m = pattern.match(rest)
        if m:
            return component, m["m"], role
    return None


def _pattern_value(patterns: Mapping[str, object], names: Iterable[str]):
    """peft's ``get_pattern_key`` rule: a pattern matches a module name it ends (at a '.')."""
    for pattern, value in patterns.items():
        if any(re.match(rf"(.*\.)?({pattern})$", n) for n in names):
            return value
    return None


def _peft_scale(config: Mapping, component: str, name: str, rank: int) -> float | None:
    """alpha / rank (or / sqrt(rank) with rsLoRA) for one module from a peft LoraConfig dict."""
    if "lora_alpha" not in config:
        return None
    names = [name, "text_model." + name] if component.startswith("text_encoder") else [name]
    alpha = _pattern_value(config.get("alpha_pattern") or {}, names)
    alpha = float(config["lora_alpha"] if alpha is None else alpha)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _file_configs(path: Path, metadata: Mapping[str, str], keys: Iterable[str]) -> dict[str, dict]:
    """{component: peft LoraConfig dict} from diffusers' metadata, or a peft adapter_config.json beside the file."""
    out: dict[str, dict] = {}
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            packed = json.loads(raw)
            if "lora_alpha" in packed:  # one model's config (diffusers' ModelMixin.save_lora_adapter)
                return {c: packed for c in COMPONENTS}
            for k, v in packed.items():  # a pipeline's: '<component>.<field>'
                component, _, field = k.partition(".")
                out.setdefault(component, {})[field] = v
        except (ValueError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{path}: metadata '{METADATA_KEY}' is not a JSON object of LoRA configs ({e})") \
                from None
        return out
    cfg = path.parent / "adapter_config.json"
    if cfg.is_file() and any(k.startswith("base_model.model.") for k in keys):
        try:
            config = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read {cfg.name} beside it: {e}") from None
        if isinstance(config, dict):
            return {c: config for c in COMPONENTS}
    return out


def read_lora(path: str | Path, module_names: Mapping[str, Iterable[str]] | None = None
              ) -> dict[str, dict[str, LoRAWeights]]:
    """``{component: {module name: LoRAWeights}}`` of a diffusers, peft or kohya LoRA file.

    Module names are ours (diffusers' UNet names; text encoder without ``text_model.``). Kohya
    names stay '_'-joined unless ``module_names`` ({component: our module names}) resolves them
    (``apply_lora`` resolves them too). Scale: a ``.alpha`` tensor, else diffusers' adapter
    metadata / peft's adapter_config.json, else 1 (alpha = rank)."""
    path = Path(path)
    tensors = read_safetensors(path)
    configs = _file_configs(path, tensors.metadata, tensors)
    parts: dict[tuple[str, str], dict[str, str]] = {}
    for key in tensors:
        for pattern, what in _UNSUPPORTED:
            if pattern.search(key):
                raise CheckpointError(f"{path}: {what} adapters are not supported (key '{key}')")
        parsed = _parse_key(key)
        if parsed is None:
            raise CheckpointError(f"{path}: not a LoRA file we can read: unknown key '{key}' (expected diffusers/peft "
                                  "'<module>.lora_A.weight' / 'lora_B' or kohya 'lora_unet_<module>.lora_down.weight' "
                                  "/ 'lora_up' / 'alpha' keys)")
        component, name, role = parsed
        slot = parts.setdefault((component, name), {})
        if role in slot:
            raise CheckpointError(f"{path}: keys '{slot[role]}' and '{key}' are both the {role} weight of "
                                  f"{component} layer {name}")
        slot[role] = key
    if not parts:
        raise CheckpointError(f"{path}: holds no tensors, not a LoRA file")
    out: dict[str, dict[str, LoRAWeights]] = {}
    for (component, name), slot in parts.items():
        if "down" not in slot or "up" not in slot:
            have = slot.get("down") or slot.get("up") or slot["alpha"]
            missing = "up" if "down" in slot else "down"
            raise CheckpointError(f"{path}: '{have}' has no matching {missing} weight (incomplete LoRA file?)")
        down_t, up_t = np.asarray(tensors[slot["down"]]), np.asarray(tensors[slot["up"]])
        if down_t.ndim not in (2, 4) or up_t.ndim not in (2, 4) or (up_t.ndim == 4 and up_t.shape[2:] != (1, 1)):
            raise CheckpointError(f"{path}: LoRA tensors '{slot['down']}' {down_t.shape} and '{slot['up']}' "
                                  f"{up_t.shape} are not a (down, up) pair of a linear or conv layer")
        rank = down_t.shape[0]
        if up_t.shape[1] != rank:
            raise CheckpointError(f"{path}: '{slot['up']}' has shape {up_t.shape}, its rank ({up_t.shape[1]}) "
                                  f"differs from '{slot['down']}' {down_t.shape} (rank {rank})")
        if "alpha" in slot:
            alpha = np.asarray(tensors[slot["alpha"]], np.float64)
            if alpha.size != 1:
                raise CheckpointError(f"{path}: '{slot['alpha']}' should be one number, has shape {alpha.shape}")
            scale = float(alpha.reshape(())) / rank
        else:
            scale = _peft_scale(configs.get(component, {}), component, name, rank)
            scale = 1.0 if scale is None else scale
        out.setdefault(component, {})[name] = LoRAWeights(
            _from_torch(down_t.astype(np.float32)), _from_torch(up_t.astype(np.float32)), scale,
            (slot["down"], slot["up"]))
    if module_names is not None:
        out = {c: resolve_names(w, module_names.get(c, ()), source=str(path), component=c) for c, w in out.items()}
    return out


# ----------------------------------------------------------------------------- apply
def resolve_names(adapters: Mapping[str, LoRAWeights], module_names: Iterable[str], *, source: str = "LoRA",
                  component: str = "model") -> dict[str, LoRAWeights]:
    """``adapters`` keyed by our module names: kohya's '_'-joined names are matched against
    ``module_names``. A name matching no module is a CheckpointError naming its key."""
    names = list(module_names)
    exact = set(names)
    joined: dict[str, list[str]] = collections.defaultdict(list)
    for n in names:
        joined[n.replace(".", "_")].append(n)
    out: dict[str, LoRAWeights] = {}
    for name, w in adapters.items():
        if name in exact:
            target = name
        elif len(joined.get(name, ())) == 1:
            target = joined[name][0]
        elif name in joined:
            raise CheckpointError(f"{source}: LoRA key '{w.keys[0]}' is ambiguous: it fits {component} layers "
                                  f"{', '.join(joined[name])}")
        else:
            raise CheckpointError(f"{source}: LoRA key '{w.keys[0]}' matches no linear or conv layer of the "
                                  f"{component} (a LoRA for another model?)")
        if target in out:
            raise CheckpointError(f"{source}: LoRA keys '{out[target].keys[0]}' and '{w.keys[0]}' both adapt "
                                  f"{component} layer {target}")
        out[target] = w
    return out


def _fit(w: LoRAWeights, kernel_shape: tuple, name: str, source: str, component: str):
    """(down, 2-D up) in the kernel's layout, or a CheckpointError naming the key and both shapes."""
    *window, cin, cout = kernel_shape
    rank = w.down.shape[-1]
    down, up = w.down, w.up.reshape(w.up.shape[-2:])  # up is (r, out) or (1, 1, r, out) (read_lora checks)
    if down.ndim == 4 and not window and down.shape[:2] == (1, 1):  # a 1x1-conv LoRA on a linear layer
        down = down[0, 0]
    elif down.ndim == 2 and tuple(window) == (1, 1):  # a linear-shaped LoRA on a 1x1 conv
        down = down[None, None]
    checks = ((w.keys[0], w.down, down.shape == (*window, cin, rank), (*window, cin, rank)),
              (w.keys[1], w.up, up.shape == (rank, cout), (*(1,) * len(window), rank, cout)))
    for key, have, ok, want in checks:
        if not ok:
            raise CheckpointError(
                f"{source}: LoRA tensor '{key}' has shape {_torch_shape(have.shape)}, {component} layer {name} "
                f"(weight {_torch_shape(tuple(kernel_shape))}) needs {_torch_shape(want)} "
                "(a LoRA made for another base model?)")
    return down, up


def apply_lora(model: nnx.Module, adapters: Mapping[str, LoRAWeights], scale: float = 1.0, *,
               source: str | Path = "LoRA", component: str = "model") -> nnx.Module:
    """A copy of ``model`` with ``W += scale * adapter_scale * down @ up`` folded into each adapted
    layer's kernel (in float32, then the kernel's dtype); ``model`` is left as it was. Apply
    several files by calling it again on the result."""
    copy = nnx.merge(*nnx.split(model))  # new Variables over the same (immutable) arrays
    modules = adaptable_modules(copy)
    resolved = resolve_names(adapters, modules, source=str(source), component=component)
    updates = {}
    for name, w in resolved.items():
        kernel = modules[name].kernel
        down, up = _fit(w, tuple(kernel.shape), name, str(source), component)
        # HIGHEST: a TF32 / bf16-pass matmul (GPU / TPU default for float32) would round the delta to ~1e-3
        delta = (scale * w.scale) * jnp.einsum("...ir,ro->...io", jnp.asarray(down), jnp.asarray(up),
                                               precision=jax.lax.Precision.HIGHEST)
        updates[name] = (jnp.asarray(kernel[...], jnp.float32) + delta).astype(kernel[...].dtype)
    for name, value in updates.items():  # every shape checked before the copy is changed
        modules[name].kernel.set_value(value)  # replaces the array (host numpy arrays are read-only)
    return copy
