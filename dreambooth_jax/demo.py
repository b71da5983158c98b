"""The whole DreamBooth workflow in one call, on the embedded toy prior by default:

class images from the frozen prior -> DreamBooth fine-tuning of the base and SR stages with prior
preservation -> samples of "a [V] [class]" in contexts absent from the subject photos, before
and after -> evaluation -> grids, metrics.json and metrics.md in the output folder.

``python -m dreambooth_jax.demo`` / ``dreambooth-jax demo`` run it; ``--model``, ``--sr-model``,
``--instance-dir`` and ``--class-noun`` point it at a real checkpoint and one's own photos
(the toy evaluator only judges the toy world, so metrics are computed for the toy prior only).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dreambooth_jax.errors import ConfigError

TOY = Path(__file__).resolve().parent / "assets" / "toy"
TOY_PRIOR, TOY_SR, TOY_SUBJECT, TOY_TRAIN = TOY / "prior", TOY / "sr", TOY / "subject", TOY / "train.yaml"
TOY_CONTEXTS = ("on the beach", "in the snow", "in the city", "at night")  # absent from the subject photos


@dataclasses.dataclass
class DemoConfig:
    model: str = ""  # base model folder or hub id; "" = the embedded toy prior
    sr_model: str = ""  # x4 upscaler folder or hub id; "" = the toy SR model with the toy prior, else none
    instance_dir: str = ""  # subject photos; "" = the toy subject
    class_noun: str = "box"
    identifier: str = "sks"
    contexts: tuple = TOY_CONTEXTS  # phrases appended to "a photo of a [V] [class]"
    out: str = "out/demo"
    config: str = ""  # training YAML (TrainConfig); "" = the embedded toy config (real models: defaults)
    overrides: tuple = ()  # key=value on top of it
    prior_preservation: bool = True
    samples_per_prompt: int = 8
    sample_steps: int = 25
    guidance: float = 5.0
    sr_steps: int = 20
    sr_noise_level: int | None = None  # None: the training config's sr_noise_level
    seed: int = 0
    evaluator: str = "auto"  # auto (toy evaluator for the toy prior) | toy | none

    def __post_init__(self):
        if self.samples_per_prompt < 2:
            raise ConfigError("--samples-per-prompt must be >= 2 (diversity needs pairs)")
        if self.evaluator not in ("auto", "toy", "none"):
            raise ConfigError(f"--evaluator must be auto, toy or none, got {self.evaluator!r}")

    @property
    def toy(self) -> bool:
        return not self.model

    def prompts(self) -> tuple[str, str, list[str]]:
        inst = f"a photo of a {self.identifier} {self.class_noun}"
        return inst, f"a photo of a {self.class_noun}", [f"{inst} {c}" for c in self.contexts]


def train_config(cfg: DemoConfig):
    """The TrainConfig of the run: the YAML (embedded toy one by default) + the demo's paths."""
    from dreambooth_jax.training.config import load_config

    inst, cls, _ = cfg.prompts()
    path = cfg.config or (str(TOY_TRAIN) if cfg.toy else None)
    model = cfg.model or str(TOY_PRIOR)
    sr = cfg.sr_model or (str(TOY_SR) if cfg.toy else "")
    fixed = [f"model={model}", f"sr_model={sr}", f"instance_dir={cfg.instance_dir or TOY_SUBJECT}",
             f"instance_prompt={inst}", f"class_prompt={cls}", f"output_dir={Path(cfg.out) / 'train'}",
             f"with_prior_preservation={str(cfg.prior_preservation).lower()}", f"seed={cfg.seed}"]
    return load_config(path, fixed + list(cfg.overrides))


class Cascade:
    """Base (+ SR) samplers compiled once; ``load`` swaps in other weights of the same shapes."""

    def __init__(self, base_path: str, sr_path: str, cfg: DemoConfig, n: int):
        from dreambooth_jax.diffusion.pipeline import BaseSampler, UpscaleSampler
        from dreambooth_jax.models import load_pretrained

        self.cfg, self.n = cfg, n
        self.base = BaseSampler(load_pretrained(base_path), sampler="ddim", steps=cfg.sample_steps)
        self.sr = UpscaleSampler(load_pretrained(sr_path), sampler="ddim", steps=cfg.sr_steps) if sr_path else None

    def load(self, base_path: str, sr_path: str = "") -> None:
        from flax import nnx

        from dreambooth_jax.models import load_pretrained

        for sampler, path in ((self.base, base_path), (self.sr, sr_path)):
            if sampler is not None and path:
                pipe = load_pretrained(path)
                sampler.params = {k: nnx.state(getattr(pipe, k)) for k in ("unet", "vae", "text_encoder")}

    def __call__(self, prompts: list[str], size: int, noise_level: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``n`` samples per prompt, seeds cfg.seed .. cfg.seed + n - 1 (the same for every prompt
        and every model, so before/after grids are paired)."""
        all_prompts = [p for p in prompts for _ in range(self.n)]
        lat = np.concatenate([self.base.initial_latents(1, size, size, self.cfg.seed + i)
                              for _ in prompts for i in range(self.n)])
        low = self.base(all_prompts, latents=lat, height=size, width=size, seed=self.cfg.seed,
                        guidance=self.cfg.guidance).images
        if self.sr is None:
            return low, None
        high = self.sr(low, all_prompts, noise_level=noise_level, seed=self.cfg.seed, guidance=self.cfg.guidance).images
        return low, high


def _final(pair: tuple) -> np.ndarray:
    """The cascade's last stage: SR images if there is an SR stage, else the base images."""
    return pair[1] if pair[1] is not None else pair[0]


def evaluate_samples(images: dict, contexts: list[str], class_noun: str, subject_photos: np.ndarray) -> dict:
    """Toy-world metrics of one model's samples. images: {'subject': (P, n, H, W, 3) for the
    context prompts, 'class': (n, H, W, 3) for the class prompt}."""
    from dreambooth_jax.evaluation import toy as ev
    from dreambooth_jax.toy import world

    model = ev.load_evaluator()
    phrase_to_ctx = {v: k for k, v in world.CONTEXTS.items()}
    ref = ev.evaluate(model, subject_photos)
    groups = [ev.evaluate(model, imgs) for imgs in images["subject"]]
    flat = {k: np.concatenate([g[k] for g in groups]) for k in groups[0]}
    n = len(images["subject"][0])
    ctx_names = [phrase_to_ctx[c] for c in contexts for _ in range(n)]
    cls_out = ev.evaluate(model, images["class"])
    return {
        "subject_fidelity": ev.subject_fidelity(flat),
        "subject_similarity": ev.subject_similarity(flat, ref),
        "context_fidelity": ev.context_fidelity(flat, ctx_names),
        "class_fidelity": ev.class_fidelity(flat, class_noun),
        "PRES": ev.pres(cls_out),
        "class_prompt_class_fidelity": ev.class_fidelity(cls_out, class_noun),
        "DIV": ev.perceptual_div(groups),
        "DIV_class": ev.perceptual_div([cls_out]),
    }


METRIC_DOCS = {
    "subject_fidelity": "mean P(subject) of the toy evaluator's subject detector on 'a [V] [class] <context>' samples (DINO/CLIP-I role)",
    "subject_similarity": "mean cosine similarity of sample embeddings to the mean embedding of the real subject photos (DINO-style)",
    "context_fidelity": "mean P(prompted context) of the evaluator's context head on the same samples (CLIP-T role)",
    "class_fidelity": "mean P(class noun) on the same samples",
    "PRES": "mean P(subject) on samples of the class prompt 'a photo of a [class]' (prior preservation: lower is better)",
    "class_prompt_class_fidelity": "mean P(class noun) on the class-prompt samples (does 'a [class]' still give the class)",
    "DIV": "mean pairwise LPIPS-style distance (unit-normalised evaluator feature maps of 3 stages) among samples of one subject prompt, averaged over prompts (the paper's DIV uses LPIPS)",
    "DIV_class": "the same on the class-prompt samples",
}


def metrics_markdown(rows: dict[str, dict]) -> str:
    keys = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    lines += ["", "Definitions:"] + [f"- **{k}**: {METRIC_DOCS[k]}" for k in keys if k in METRIC_DOCS]
    return "\n".join(lines) + "\n"


def _prepare_out(cfg: DemoConfig) -> Path:
    out = Path(cfg.out)
    stamp = out / "demo_config.json"
    mine = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=list)
    if out.exists() and any(out.iterdir()):
        if not stamp.exists():
            raise ConfigError(f"output folder {out} is not empty and holds no earlier demo run; choose a new --out")
        if stamp.read_text() != mine:
            raise ConfigError(f"output folder {out} holds a demo run with other settings; choose a new --out "
                              f"(rerunning with the same settings resumes it)")
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(mine)
    return out


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Runs everything; returns {'metrics': {...} or None, 'files': [...]}."""
    from dreambooth_jax.data.images import InstanceDataset, save_image_grid, to_uint8
    from dreambooth_jax.training.run import run as train_run

    t_start = time.perf_counter()
    out = _prepare_out(cfg)
    tcfg = train_config(cfg)
    inst, cls, subject_prompts = cfg.prompts()
    prompts = subject_prompts + [cls]
    use_eval = cfg.evaluator == "toy" or (cfg.evaluator == "auto" and cfg.toy)
    noise = tcfg.sr_noise_level if cfg.sr_noise_level is None else cfg.sr_noise_level
    n, P = cfg.samples_per_prompt, len(prompts)

    log(f"[1/4] sampling the pretrained prior: {P} prompts x {n} seeds")
    cascade = Cascade(tcfg.model, tcfg.sr_model, cfg, n)
    before = cascade(prompts, tcfg.resolution, noise)

    log("[2/4] DreamBooth: class images, base stage" + (", SR stage" if tcfg.sr_model else ""))
    t0 = time.perf_counter()
    exported = train_run(tcfg, log=log)
    train_s = time.perf_counter() - t0

    log("[3/4] sampling the fine-tuned model")
    cascade.load(str(exported), str(Path(tcfg.output_dir) / "sr_model") if tcfg.sr_model else "")
    after = cascade(prompts, tcfg.resolution, noise)

    files = []
    photos = InstanceDataset(tcfg.instance_dir, tcfg.sr_resolution if tcfg.sr_model else tcfg.resolution,
                             flip=False).images
    photos_u8 = to_uint8(photos)
    save_image_grid(photos_u8, out / "subject_photos.png", cols=len(photos_u8))
    grids = {name: _final(pair).reshape(P, n, *_final(pair).shape[1:]) for name, pair in (("before", before), ("after", after))}
    for name, g in grids.items():  # one row per prompt, one column per seed
        save_image_grid(g.reshape(-1, *g.shape[2:]), out / f"{name}.png", cols=n)
    comp = np.concatenate([grids["before"], grids["after"]], axis=1)  # rows: prompts; left before, right after
    save_image_grid(comp.reshape(-1, *comp.shape[2:]), out / "comparison.png", cols=2 * n)
    files += ["subject_photos.png", "before.png", "after.png", "comparison.png"]

    metrics = None
    if use_eval:
        log("[4/4] evaluating with the toy evaluator")
        names = {"before": "pretrained prior", "after": "DreamBooth" + ("" if cfg.prior_preservation else " (no PPL)")}

        def table(stage_grids):
            return {names[k]: evaluate_samples({"subject": list(g[:-1]), "class": g[-1]}, list(cfg.contexts),
                                               cfg.class_noun, photos_u8) for k, g in stage_grids.items()}

        metrics = table(grids)  # the cascade's final images (downsampled to the evaluator's 32 px)
        report = {"metrics": metrics, "definitions": METRIC_DOCS, "prompts": prompts, "samples_per_prompt": n,
                  "train_seconds": round(train_s, 1)}
        md = metrics_markdown(metrics)
        if tcfg.sr_model:  # also the base stage alone: where "[V]" is bound, before the SR stage
            base = {k: pair[0].reshape(P, n, *pair[0].shape[1:]) for k, pair in (("before", before), ("after", after))}
            report["metrics_base_stage"] = table(base)
            md = ("Final images (base + SR stage):\n\n" + md + "\nBase stage alone (32 px):\n\n"
                  + metrics_markdown(report["metrics_base_stage"]).split("\nDefinitions:")[0] + "\n")
        md = ("Encoders: the toy world's evaluator (dreambooth_jax/assets/toy/evaluator, a small CNN trained on "
              "fresh toy renders; its heads play DINO / CLIP-I / CLIP-T / LPIPS). For real models: "
              "`dreambooth-jax evaluate` with DINO, CLIP and LPIPS.\n\n" + md)
        report["encoders"] = "toy evaluator (dreambooth_jax/assets/toy/evaluator)"
        (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "metrics.md").write_text(md)
        files += ["metrics.json", "metrics.md"]
        log(md)
    else:
        log("[4/4] no evaluator for this model (the toy evaluator only judges the toy world); grids written")
    log(f"done in {time.perf_counter() - t_start:.0f}s: " + ", ".join(str(out / f) for f in files))
    return {"metrics": metrics, "files": files, "out": str(out)}


# ----------------------------------------------------------------------------- command line
def _command():
    import click

    from dreambooth_jax.errors import user_errors

    @click.command(context_settings={"ignore_unknown_options": True})
    @click.option("--model", default="", help="Base model folder or hub id (default: the embedded toy prior).")
    @click.option("--sr-model", default="", help="x4 upscaler folder or hub id (default: the toy SR model with the toy prior).")
    @click.option("--instance-dir", default="", help="Folder of 3-5 subject photos (default: the toy subject).")
    @click.option("--class-noun", default="box", show_default=True)
    @click.option("--identifier", default="sks", show_default=True, help="The rare token [V].")
    @click.option("--context", "contexts", multiple=True, help="Context phrase for the samples (repeatable), "
                  "e.g. 'in the snow'; default: four contexts absent from the toy subject's photos.")
    @click.option("--config", default="", help="Training YAML (default: the embedded toy config).")
    @click.option("--no-prior-preservation", is_flag=True, help="Ablation: fine-tune without the prior loss.")
    @click.option("--samples-per-prompt", default=8, show_default=True)
    @click.option("--evaluator", default="auto", show_default=True, help="auto | toy | none")
    @click.option("--seed", default=0, show_default=True)
    @click.option("--out", default="out/demo", show_default=True, help="Output folder (new, or an earlier run to resume).")
    @click.argument("overrides", nargs=-1)
    @user_errors
    def demo(model, sr_model, instance_dir, class_noun, identifier, contexts, config, no_prior_preservation,
             samples_per_prompt, evaluator, seed, out, overrides):
        """DreamBooth end to end: class images, fine-tuning (base + SR), before/after samples,
        metrics. OVERRIDES are training-config key=value pairs (e.g. max_train_steps=200)."""
        from dreambooth_jax.sampling import enable_compilation_cache

        enable_compilation_cache()  # a rerun (or the ablation's second run) skips recompiling
        cfg = DemoConfig(model=model, sr_model=sr_model, instance_dir=instance_dir, class_noun=class_noun,
                         identifier=identifier, contexts=tuple(contexts) or TOY_CONTEXTS, config=config,
                         overrides=tuple(overrides), prior_preservation=not no_prior_preservation,
                         samples_per_prompt=samples_per_prompt, evaluator=evaluator, seed=seed, out=out)
        run_demo(cfg, log=lambda m: click.echo(m, err=True))

    return demo


demo = _command()

if __name__ == "__main__":
    demo()
