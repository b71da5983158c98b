"""``dreambooth-jax evaluate``: score a fine-tuned model as the DreamBooth paper does.

Given the fine-tuned model (or a folder of images it already generated), the subject's real
photos, the class noun and the encoders (DINO ViT, CLIP, LPIPS: see :mod:`.encoders`), it

1. generates ``num_images`` images (seeds ``seed .. seed + n - 1``) for each prompt (the paper's 25
   for the class, or ``--prompts FILE``), base stage then the SR stage when given, and
   ``class_images`` images of the class prompt "a [class]" for PRES;
2. computes DINO, CLIP-I, CLIP-T, PRES and DIV (:mod:`.metrics`), overall and per prompt, and the
   real photos' own DINO / CLIP-I (the paper's "real images" row);
3. writes ``metrics.json``, ``metrics.md`` (with the paper's numbers beside, and the encoders that
   produced them) and a contact sheet per model (a row per prompt); ``before`` also scores the
   frozen prior with the same seeds for a before/after table.

Images are written under ``out/images/<tag>/pNN/KK.png`` and ``out/images/<tag>/class/KK.png`` with
``prompts.json`` beside: the same layout ``images=`` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.evaluation import metrics as M

MIN_PHOTOS = 2  # one photo would make DINO / CLIP-I a similarity to that single shot


@dataclasses.dataclass
class EvalConfig:
    """What ``dreambooth-jax evaluate`` does; field names follow the CLI options."""

    instance_dir: str  # the subject's real photos
    class_noun: str
    out: str
    dino: str  # DINO ViT folder (transformers layout) or hub id, e.g. facebook/dino-vits16
    clip: str  # CLIP folder or hub id, e.g. openai/clip-vit-base-patch32
    lpips: str  # LPIPS safetensors file (scripts/convert_lpips.py)
    model: str = ""  # fine-tuned base model (diffusers folder or hub id) ...
    images: str = ""  # ... or a folder of images it generated (this command's layout)
    sr_model: str = ""  # x4 upscaler for the SR stage (optional)
    before: str = ""  # the frozen prior: also scored, with the same seeds
    identifier: str = "sks"
    prompts: str = ""  # prompt template file; "" = the paper's 25 for the class
    num_images: int = 4  # per prompt (the paper: 4)
    class_images: int = 16  # images of "a [class]" for PRES
    seed: int = 0
    sample_steps: int = 50
    sr_steps: int = 50
    guidance: float = 7.5
    sr_noise_level: int = 20
    size: int = 512  # base-stage image size
    batch: int = 8  # images per sampler call

    def templates(self) -> list[str]:
        return M.read_prompt_file(self.prompts) if self.prompts else M.paper_prompts(self.class_noun)


def check_config(cfg: EvalConfig) -> None:
    """Every option, before anything is loaded."""
    if bool(cfg.model) == bool(cfg.images):
        raise ConfigError("give either --model (generate, then score) or --images (score images already made)")
    if cfg.images and cfg.before:
        raise ConfigError("--before generates with the frozen prior: use it with --model, not --images")
    if not cfg.class_noun.strip():
        raise ConfigError("--class-noun is empty")
    if not cfg.identifier.strip():
        raise ConfigError("--identifier is empty")
    if cfg.num_images < 2:
        raise ConfigError(f"--num-images must be >= 2 (DIV compares pairs of images of one prompt), got {cfg.num_images}")
    for key in ("class_images", "sample_steps", "sr_steps", "batch", "size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if cfg.size % 8:
        raise ConfigError(f"--size must be a multiple of 8, got {cfg.size}")
    photos(cfg.instance_dir)
    cfg.templates()


def photos(folder: str) -> list[Path]:
    """The real photos (at least MIN_PHOTOS), or a ConfigError naming the folder."""
    from dreambooth_jax.data.images import list_images

    path = Path(folder)
    if not folder or not path.is_dir():
        raise ConfigError(f"--instance-dir {folder!r}: no such folder (the subject's real photos)")
    files = list_images(path, warn=False)
    if len(files) < MIN_PHOTOS:
        raise ConfigError(f"--instance-dir {folder}: {len(files)} photo(s); at least {MIN_PHOTOS} are needed "
                          "(DINO / CLIP-I compare the generated images with every real photo)")
    return files


def load_photos(files: list[Path]) -> list[np.ndarray]:
    """The photos as uint8 RGB arrays at their own size (each encoder resizes as its processor does)."""
    from PIL import Image, ImageOps

    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
        except OSError as e:
            raise ConfigError(f"{f}: not a readable image ({e})") from e
    return out


# ----------------------------------------------------------------------------- images on disk
def write_images(folder: Path, prompts: list[str], per_prompt: np.ndarray, class_prompt: str,
                 class_imgs: np.ndarray) -> None:
    from PIL import Image

    for p, imgs in enumerate(per_prompt):
        (folder / f"p{p:02d}").mkdir(parents=True, exist_ok=True)
        for k, im in enumerate(imgs):
            Image.fromarray(im).save(folder / f"p{p:02d}" / f"{k:02d}.png")
    (folder / "class").mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(class_imgs):
        Image.fromarray(im).save(folder / "class" / f"{k:02d}.png")
    (folder / "prompts.json").write_text(json.dumps({"prompts": prompts, "class_prompt": class_prompt}, indent=1))


def read_images(folder: str, prompts: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """Images of ``write_images``' layout: (one (n, H, W, 3) array per prompt, the class images)."""
    from PIL import Image

    from dreambooth_jax.data.images import list_images

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--images {folder}: no such folder")

    def stack(sub: Path) -> np.ndarray:
        files = list_images(sub, warn=False) if sub.is_dir() else []
        if len(files) < 2:
            raise ConfigError(f"--images: {sub} holds {len(files)} image(s); at least 2 per prompt are needed")
        imgs = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        if len({i.shape for i in imgs}) != 1:
            raise ConfigError(f"--images: the images in {sub} differ in size")
        return np.stack(imgs)

    index = root / "prompts.json"
    if index.is_file():
        stored = json.loads(index.read_text()).get("prompts", [])
        if stored != prompts:
            raise ConfigError(f"--images {folder}: its prompts.json lists {len(stored)} prompts that differ from the "
                              f"{len(prompts)} being scored (first: {stored[:1]} vs {prompts[:1]}); pass the same "
                              "--prompts / --class-noun / --identifier")
    subs = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("p"))
    if len(subs) != len(prompts):
        raise ConfigError(f"--images {folder}: {len(subs)} prompt folders (p00, p01, ...) for {len(prompts)} prompts")
    return [stack(root / f"p{i:02d}") for i in range(len(prompts))], stack(root / "class")


# ----------------------------------------------------------------------------- generation
def generate(cfg: EvalConfig, cascade, prompts: list[str], class_prompt: str, log) -> tuple[np.ndarray, np.ndarray]:
    """(P, n, H, W, 3) images of the prompts and (class_images, H, W, 3) of the class prompt, the
    final stage of the cascade, in batches of ``cfg.batch`` images; seeds seed .. seed + n - 1 for
    every prompt (the same for every model: before/after pairs share their noise)."""
    jobs = [(p, k) for p in range(len(prompts)) for k in range(cfg.num_images)]
    jobs += [(-1, k) for k in range(cfg.class_images)]
    out: dict = {}
    t0 = time.perf_counter()
    for start in range(0, len(jobs), cfg.batch):
        chunk = jobs[start:start + cfg.batch]
        texts = [prompts[p] if p >= 0 else class_prompt for p, _ in chunk]
        seeds = [cfg.seed + k for _, k in chunk]
        imgs = cascade.images(texts, seeds)
        for job, im in zip(chunk, imgs):
            out[job] = im
        log(f"  {min(start + cfg.batch, len(jobs))}/{len(jobs)} images ({time.perf_counter() - t0:.0f} s)")
    per_prompt = np.stack([np.stack([out[(p, k)] for k in range(cfg.num_images)]) for p in range(len(prompts))])
    return per_prompt, np.stack([out[(-1, k)] for k in range(cfg.class_images)])


def data_mesh(batch: int):
    """A data-parallel mesh over this process's devices when ``batch`` splits over them, else None
    (one device). The sampler calls and the encoders then run each batch sharded over the devices."""
    import jax

    from dreambooth_jax.sharding import make_mesh

    n = jax.local_device_count()
    return make_mesh(1, jax.local_devices()) if n > 1 and jax.process_count() == 1 and batch % n == 0 else None


class Cascade:
    """Base (+ SR) samplers compiled once per batch shape; ``load`` swaps in another model's weights."""

    def __init__(self, cfg: EvalConfig, base_path: str):
        from dreambooth_jax.diffusion.pipeline import BaseSampler, UpscaleSampler
        from dreambooth_jax.models import load_pretrained

        self.cfg = cfg
        mesh = data_mesh(cfg.batch)
        self.base = BaseSampler(load_pretrained(base_path), sampler="ddim", steps=cfg.sample_steps, mesh=mesh)
        self.sr = (UpscaleSampler(load_pretrained(cfg.sr_model), sampler="ddim", steps=cfg.sr_steps, mesh=mesh)
                   if cfg.sr_model else None)

    def load(self, base_path: str) -> None:
        from flax import nnx

        from dreambooth_jax.models import load_pretrained

        pipe = load_pretrained(base_path)
        self.base.params = {k: nnx.state(getattr(pipe, k)) for k in ("unet", "vae", "text_encoder")}

    def images(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        n = len(prompts)
        pad = (-n) % self.cfg.batch  # one batch shape: one compile
        prompts, seeds = prompts + prompts[-1:] * pad, seeds + seeds[-1:] * pad
        s = self.cfg.size
        lat = np.concatenate([self.base.initial_latents(1, s, s, seed) for seed in seeds])
        low = self.base(prompts, latents=lat, height=s, width=s, seed=self.cfg.seed, guidance=self.cfg.guidance).images
        if self.sr is not None:
            low = self.sr(low, prompts, noise_level=self.cfg.sr_noise_level, seed=self.cfg.seed,
                          guidance=self.cfg.guidance).images
        return low[:n]


# ----------------------------------------------------------------------------- scoring
def score(enc, prompts: list[str], texts: list[str], per_prompt: np.ndarray, class_imgs: np.ndarray,
          real: dict) -> dict:
    """The five metrics, overall and per prompt. ``enc``: the Encoders; ``texts``: CLIP-T's text of
    each prompt; ``real``: the real photos' embeddings {'dino', 'clip'}."""
    p, n = len(per_prompt), len(per_prompt[0])
    flat = np.concatenate(list(per_prompt))
    dino, clip = enc.dino(flat), enc.clip_image(flat)
    text = enc.clip_text(texts)
    i, j = M.pairs(n)
    dists = [enc.lpips(imgs[i], imgs[j]) for imgs in per_prompt]
    rows = []
    for k in range(p):
        sl = slice(k * n, (k + 1) * n)
        rows.append({"prompt": prompts[k], "DINO": M.pairwise_cosine(dino[sl], real["dino"]),
                     "CLIP-I": M.pairwise_cosine(clip[sl], real["clip"]),
                     "CLIP-T": M.matched_cosine(clip[sl], np.repeat(text[k:k + 1], n, 0)),
                     "DIV": float(np.mean(dists[k]))})
    overall = {"DINO": M.pairwise_cosine(dino, real["dino"]), "CLIP-I": M.pairwise_cosine(clip, real["clip"]),
               "CLIP-T": M.matched_cosine(clip, np.repeat(text, n, 0)),
               "PRES": M.pairwise_cosine(enc.dino(class_imgs), real["dino"]), "DIV": M.diversity(dists)}
    return {"overall": overall, "per_prompt": rows}


def real_row(real: dict) -> dict:
    """DINO / CLIP-I among the real photos themselves (distinct pairs): the paper's upper reference."""
    out = {}
    for key, name in (("dino", "DINO"), ("clip", "CLIP-I")):
        e = real[key]
        i, j = M.pairs(len(e))
        out[name] = M.matched_cosine(e[i], e[j])
    return out


def contact_sheet(per_prompt: np.ndarray, path: Path) -> Path:
    from dreambooth_jax.data.images import save_image_grid

    return save_image_grid(np.concatenate(list(per_prompt)), path, cols=per_prompt.shape[1])


def write_report(out: Path, result: dict) -> None:
    """metrics.json (everything) and metrics.md (the tables, the paper beside, the encoders named)."""
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    cols = M.METRICS
    lines = ["# DreamBooth metrics", "",
             f"Subject photos: `{result['settings']['instance_dir']}` ({result['settings']['photos']}); class "
             f"'{result['settings']['class_noun']}'; {len(result['prompts'])} prompts x "
             f"{result['settings']['num_images']} images, {result['settings']['class_images']} class-prompt images "
             f"(PRES); seeds from {result['settings']['seed']}.", "",
             "Encoders: " + "; ".join(f"{k}: `{v}`" for k, v in result["encoders"].items()), "",
             "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for tag, res in result["models"].items():
        lines.append(f"| {tag} | " + " | ".join(f"{res['overall'][c]:.3f}" for c in cols) + " |")
    lines.append("| real photos (distinct pairs) | " + " | ".join(
        f"{result['real'][c]:.3f}" if c in result["real"] else "" for c in cols) + " |")
    for name, vals in M.PAPER.items():
        lines.append(f"| paper: {name} | " + " | ".join(f"{vals[c]:.3f}" if c in vals else "" for c in cols) + " |")
    lines += ["", "Higher is better except PRES (the subject leaking into its class). The paper's numbers are "
              "averages over 30 subjects with DINO ViT-S/16, CLIP ViT-B/32 and LPIPS; compare like with like."]
    for tag, res in result["models"].items():
        lines += ["", f"## Per prompt: {tag}", "", "| prompt | DINO | CLIP-I | CLIP-T | DIV |", "|---|---|---|---|---|"]
        lines += [f"| {r['prompt']} | {r['DINO']:.3f} | {r['CLIP-I']:.3f} | {r['CLIP-T']:.3f} | {r['DIV']:.3f} |"
                  for r in res["per_prompt"]]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")


def evaluate(cfg: EvalConfig, log: Callable[[str], None] = print) -> dict:
    """Generate (or read) the images, score them, write the report; returns metrics.json's content."""
    from dreambooth_jax.evaluation.encoders import BATCH, load_encoders
    from dreambooth_jax.sampling import check_output_folder

    check_config(cfg)
    out = check_output_folder(cfg.out)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty: give a new or empty folder (an earlier report is never overwritten)")
    files = photos(cfg.instance_dir)
    templates = cfg.templates()
    prompts = [M.fill(t, cfg.identifier, cfg.class_noun) for t in templates]
    texts = [M.clip_t_text(t, cfg.class_noun) for t in templates]
    class_prompt = f"a {cfg.class_noun}"
    enc = load_encoders(cfg.dino, cfg.clip, cfg.lpips, mesh=data_mesh(BATCH))
    real_imgs = load_photos(files)
    real = {"dino": enc.dino(real_imgs), "clip": enc.clip_image(real_imgs)}
    images: dict[str, tuple] = {}
    if cfg.images:
        images["given images"] = read_images(cfg.images, prompts)
    else:
        cascade = Cascade(cfg, cfg.model)
        for tag, model in (("fine-tuned", cfg.model), ("before (frozen prior)", cfg.before)):
            if not model:
                continue
            if model != cfg.model:
                cascade.load(model)
            log(f"generating with {tag}: {len(prompts)} prompts x {cfg.num_images} + {cfg.class_images} class images")
            per_prompt, class_imgs = generate(cfg, cascade, prompts, class_prompt, log)
            write_images(out / "images" / tag.split()[0], prompts, per_prompt, class_prompt, class_imgs)
            images[tag] = (per_prompt, class_imgs)
    result = {"settings": {**dataclasses.asdict(cfg), "photos": len(files)}, "encoders": enc.names,
              "prompts": prompts, "class_prompt": class_prompt, "clip_t_texts": texts,
              "real": real_row(real), "models": {}}
    for tag, (per_prompt, class_imgs) in images.items():
        log(f"scoring {tag}")
        result["models"][tag] = score(enc, prompts, texts, np.asarray(per_prompt), class_imgs, real)
        contact_sheet(np.asarray(per_prompt), out / f"contact_sheet_{tag.split()[0]}.png")
    write_report(out, result)
    return result
