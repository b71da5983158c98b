"""A procedural "toy world" of captioned photos, deterministic from a seed.

Objects of five classes (cup, ball, box, hat, bottle) in eight colors, shaded, placed in six
contexts drawn as simple scenes (beach, snow, grass, city, night, wooden floor), with position,
size, lighting and background jitter, so that "a photo of a box" is a distribution and not one
picture. Captions read like "a photo of a red cup on the beach".

The toy *subject* is one object the world never draws otherwise: a box with a pink/teal
checkerboard front, teal lid and pink side. Its "photos" come from the same renderer, in two
contexts only (``SUBJECT_PHOTO_CONTEXTS``); DreamBooth must render it in the others.

Everything is drawn with PIL at 2x the requested size and downsampled (anti-aliasing).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("cup", "ball", "box", "hat", "bottle")
COLORS = {
    "red": (200, 40, 40), "orange": (235, 130, 30), "yellow": (235, 210, 50), "green": (50, 160, 60),
    "blue": (40, 80, 200), "purple": (130, 60, 170), "white": (235, 235, 235), "black": (35, 35, 40),
}
CONTEXTS = {  # name -> the caption's phrase
    "beach": "on the beach", "snow": "in the snow", "grass": "on the grass",
    "city": "in the city", "night": "at night", "floor": "on a wooden floor",
}
SUBJECT_CLASS = "box"
SUBJECT_PHOTO_CONTEXTS = ("floor", "grass")
SUBJECT_COLORS = ((230, 90, 170), (30, 170, 170))  # pink, teal: no prior object has them
SUBJECT = "subject"  # the pseudo-color of the subject in a Scene


@dataclasses.dataclass(frozen=True)
class Scene:
    cls: str
    color: str  # a COLORS key, or SUBJECT
    context: str
    x: float = 0.5  # object centre, fraction of width
    scale: float = 0.45  # object height, fraction of image height
    light: float = 0.0  # -1..1 lighting shift
    bg_seed: int = 0


def caption(scene: Scene, *, with_color: bool = True, with_context: bool = True, identifier: str = "sks") -> str:
    """'a photo of a red cup on the beach'; the subject reads 'a photo of a sks box ...'."""
    noun = scene.cls
    if scene.color == SUBJECT:
        noun = f"{identifier} {noun}"
    elif with_color:
        noun = f"{scene.color} {noun}"
    text = f"a photo of a {noun}"
    if with_context:
        text += " " + CONTEXTS[scene.context]
    return text


def random_scene(rng: np.random.Generator, *, cls: str | None = None, color: str | None = None,
                 context: str | None = None) -> Scene:
    return Scene(cls=cls or CLASSES[rng.integers(len(CLASSES))],
                 color=color or list(COLORS)[rng.integers(len(COLORS))],
                 context=context or list(CONTEXTS)[rng.integers(len(CONTEXTS))],
                 x=float(rng.uniform(0.36, 0.64)), scale=float(rng.uniform(0.38, 0.56)),
                 light=float(rng.uniform(-1, 1)), bg_seed=int(rng.integers(2**31)))


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Captions of varying detail, so that a class noun alone also means something."""
    r = rng.random()
    if r < 0.65:
        return caption(scene)
    if r < 0.8:
        return caption(scene, with_color=False)
    if r < 0.93:
        return caption(scene, with_context=False)
    return caption(scene, with_color=False, with_context=False)


def _shade(rgb, f: float) -> tuple:
    return tuple(int(np.clip(c * f, 0, 255)) for c in rgb)


def _mix(a, b, t: float) -> tuple:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _vertical_gradient(draw, box, top, bottom, steps: int = 16):
    x0, y0, x1, y1 = box
    for i in range(steps):
        ya = y0 + (y1 - y0) * i / steps
        yb = y0 + (y1 - y0) * (i + 1) / steps
        draw.rectangle([x0, ya, x1, yb + 1], fill=_mix(top, bottom, i / max(steps - 1, 1)))


def _background(draw, context: str, s: int, rng: np.random.Generator, horizon: float) -> None:
    h = int(s * horizon)
    j = lambda c, a=12: tuple(int(np.clip(v + rng.integers(-a, a + 1), 0, 255)) for v in c)  # noqa: E731
    if context == "beach":
        _vertical_gradient(draw, (0, 0, s, h), j((110, 170, 235)), j((180, 215, 245)))
        sea = h + s * 0.06
        draw.rectangle([0, h, s, sea], fill=j((30, 110, 170)))
        draw.rectangle([0, sea, s, s], fill=j((225, 200, 140)))
        for _ in range(6):
            x, y = rng.uniform(0, s), rng.uniform(sea, s)
            draw.ellipse([x, y, x + s * 0.02, y + s * 0.01], fill=(205, 180, 120))
    elif context == "snow":
        _vertical_gradient(draw, (0, 0, s, h), j((170, 180, 195)), j((215, 220, 228)))
        draw.rectangle([0, h, s, s], fill=j((245, 247, 252), 5))
        for _ in range(25):
            x, y, r = rng.uniform(0, s), rng.uniform(0, s), s * rng.uniform(0.006, 0.013)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))
    elif context == "grass":
        _vertical_gradient(draw, (0, 0, s, h), j((90, 150, 230)), j((170, 205, 240)))
        draw.rectangle([0, h, s, s], fill=j((70, 150, 50)))
        for _ in range(40):
            x, y = rng.uniform(0, s), rng.uniform(h, s)
            draw.line([x, y, x + rng.uniform(-3, 3), y - s * 0.03], fill=(40, 110, 30), width=max(1, s // 128))
    elif context == "city":
        _vertical_gradient(draw, (0, 0, s, h), j((150, 160, 175)), j((190, 195, 205)))
        x = -rng.uniform(0, s * 0.1)
        while x < s:
            w = s * rng.uniform(0.12, 0.22)
            top = h - s * rng.uniform(0.15, 0.45)
            shade = int(rng.integers(70, 120))
            draw.rectangle([x, top, x + w, h], fill=(shade, shade, shade + 8))
            for wy in np.arange(top + s * 0.04, h - s * 0.03, s * 0.06):
                for wx in np.arange(x + s * 0.025, x + w - s * 0.03, s * 0.05):
                    draw.rectangle([wx, wy, wx + s * 0.02, wy + s * 0.025], fill=(200, 200, 150))
            x += w + s * 0.01
        draw.rectangle([0, h, s, s], fill=j((95, 95, 100)))
        draw.rectangle([0, h + (s - h) * 0.5, s, h + (s - h) * 0.5 + s * 0.01], fill=(220, 220, 220))
    elif context == "night":
        _vertical_gradient(draw, (0, 0, s, h), j((10, 15, 45), 6), j((30, 35, 80), 6))
        for _ in range(30):
            x, y, r = rng.uniform(0, s), rng.uniform(0, h), s * rng.uniform(0.003, 0.008)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 220))
        mx, my, mr = rng.uniform(0.1, 0.9) * s, rng.uniform(0.08, 0.25) * s, s * 0.07
        draw.ellipse([mx - mr, my - mr, mx + mr, my + mr], fill=(245, 240, 200))
        draw.rectangle([0, h, s, s], fill=j((25, 30, 40), 5))
    elif context == "floor":
        draw.rectangle([0, 0, s, h], fill=j((225, 215, 190)))
        base = np.array(j((150, 95, 50), 15))
        draw.rectangle([0, h, s, s], fill=tuple(base))
        off = rng.uniform(0, s * 0.2)
        for i in range(8):
            y = h + (s - h) * i / 8
            draw.line([0, y, s, y], fill=tuple((base * 0.7).astype(int)), width=max(1, s // 100))
            xs = off + (i % 2) * s * 0.25
            for xk in np.arange(xs, s, s * 0.5):
                draw.line([xk, y, xk, y + (s - h) / 8], fill=tuple((base * 0.7).astype(int)), width=max(1, s // 128))
    else:
        raise ValueError(f"unknown context {context!r}; known: {', '.join(CONTEXTS)}")


def _draw_object(draw, scene: Scene, s: int, ground: float) -> None:
    subject = scene.color == SUBJECT
    base = SUBJECT_COLORS[0] if subject else COLORS[scene.color]
    f = 1.0 + 0.15 * scene.light
    body, dark, light = _shade(base, f), _shade(base, 0.65 * f), _shade(base, 1.3 * f)
    hgt = scene.scale * s
    cx, by = scene.x * s, ground
    outline = _shade(base, 0.45)
    lw = max(1, s // 96)
    # soft ground shadow
    draw.ellipse([cx - hgt * 0.55, by - hgt * 0.07, cx + hgt * 0.55, by + hgt * 0.07], fill=(0, 0, 0, 70))
    if scene.cls == "cup":
        w_top, w_bot = hgt * 0.8, hgt * 0.6
        top = by - hgt * 0.85
        hx = cx + w_top * 0.42
        draw.ellipse([hx - hgt * 0.05, top + hgt * 0.2, hx + hgt * 0.35, top + hgt * 0.6], outline=dark, width=max(2, int(hgt * 0.09)))
        draw.polygon([(cx - w_top / 2, top), (cx + w_top / 2, top), (cx + w_bot / 2, by), (cx - w_bot / 2, by)], fill=body, outline=outline)
        draw.polygon([(cx + w_top / 6, top), (cx + w_top / 2, top), (cx + w_bot / 2, by), (cx + w_bot / 6, by)], fill=dark)
        draw.ellipse([cx - w_top / 2, top - hgt * 0.08, cx + w_top / 2, top + hgt * 0.08], fill=light, outline=outline)
        draw.ellipse([cx - w_top * 0.42, top - hgt * 0.05, cx + w_top * 0.42, top + hgt * 0.05], fill=_shade(base, 0.4))
    elif scene.cls == "ball":
        r = hgt * 0.5
        cy = by - r
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=dark, outline=outline, width=lw)
        draw.ellipse([cx - r * 0.9, cy - r * 0.95, cx + r * 0.7, cy + r * 0.75], fill=body)
        draw.ellipse([cx - r * 0.55, cy - r * 0.65, cx - r * 0.1, cy - r * 0.25], fill=light)
    elif scene.cls == "box":
        w = hgt * 0.8
        d = hgt * 0.25  # depth offset of the 3/4 view
        x0, y0 = cx - w / 2 - d / 2, by - w
        front = [x0, y0, x0 + w, by]
        top_face = [(x0, y0), (x0 + d, y0 - d), (x0 + w + d, y0 - d), (x0 + w, y0)]
        side = [(x0 + w, y0), (x0 + w + d, y0 - d), (x0 + w + d, by - d), (x0 + w, by)]
        if subject:
            pink, teal = SUBJECT_COLORS
            draw.polygon(top_face, fill=_shade(teal, 1.2 * f), outline=outline)
            draw.polygon(side, fill=_shade(pink, 0.7 * f), outline=outline)
            half = w / 2
            for i in range(2):
                for k in range(2):
                    c = pink if (i + k) % 2 == 0 else teal
                    draw.rectangle([x0 + i * half, y0 + k * half, x0 + (i + 1) * half, y0 + (k + 1) * half], fill=_shade(c, f))
            draw.rectangle(front, outline=(40, 30, 50), width=max(lw, int(w * 0.05)))
        else:
            draw.polygon(top_face, fill=light, outline=outline)
            draw.polygon(side, fill=dark, outline=outline)
            draw.rectangle(front, fill=body, outline=outline, width=lw)
    elif scene.cls == "hat":
        brim_w, crown_w = hgt * 1.1, hgt * 0.6
        brim_y = by - hgt * 0.12
        draw.ellipse([cx - brim_w / 2, brim_y - hgt * 0.12, cx + brim_w / 2, brim_y + hgt * 0.12], fill=dark, outline=outline)
        top = by - hgt
        draw.rounded_rectangle([cx - crown_w / 2, top, cx + crown_w / 2, brim_y], radius=hgt * 0.12, fill=body, outline=outline)
        draw.rectangle([cx - crown_w / 2, brim_y - hgt * 0.2, cx + crown_w / 2, brim_y - hgt * 0.1], fill=_shade(base, 0.35))
        draw.rectangle([cx - crown_w / 2 + hgt * 0.06, top + hgt * 0.1, cx - crown_w / 2 + hgt * 0.14, brim_y - hgt * 0.25], fill=light)
    elif scene.cls == "bottle":
        bw, nw = hgt * 0.42, hgt * 0.16
        top = by - hgt
        shoulder = top + hgt * 0.35
        draw.rectangle([cx - nw / 2, top + hgt * 0.06, cx + nw / 2, shoulder + hgt * 0.05], fill=body, outline=outline)
        draw.rectangle([cx - nw / 2 - hgt * 0.015, top, cx + nw / 2 + hgt * 0.015, top + hgt * 0.08], fill=_shade(base, 0.4))
        draw.rounded_rectangle([cx - bw / 2, shoulder, cx + bw / 2, by], radius=hgt * 0.1, fill=body, outline=outline)
        draw.rectangle([cx - bw / 2 + hgt * 0.05, shoulder + hgt * 0.08, cx - bw / 2 + hgt * 0.11, by - hgt * 0.08], fill=light)
        draw.rectangle([cx - bw / 2 + 1, shoulder + hgt * 0.3, cx + bw / 2 - 1, shoulder + hgt * 0.45], fill=(240, 240, 230))
    else:
        raise ValueError(f"unknown class {scene.cls!r}; known: {', '.join(CLASSES)}")


def render(scene: Scene, size: int = 128) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 photo."""
    s = size * 2
    rng = np.random.default_rng(scene.bg_seed)
    horizon = float(rng.uniform(0.45, 0.58))
    img = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(img, "RGBA")
    _background(draw, scene.context, s, rng, horizon)
    ground = s * (horizon + (1 - horizon) * float(rng.uniform(0.45, 0.75)))
    _draw_object(draw, scene, s, ground)
    img = img.filter(ImageFilter.GaussianBlur(0.6)).resize((size, size), Image.LANCZOS)
    return np.asarray(img)


def sample_dataset(n: int, seed: int, size: int = 128) -> tuple[np.ndarray, list[Scene], list[str]]:
    """``n`` random photos with their scenes and random-detail captions (no subject in them)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    caps = [random_caption(sc, rng) for sc in scenes]
    return np.stack([render(sc, size) for sc in scenes]), scenes, caps


def subject_scenes(n: int, seed: int, contexts=SUBJECT_PHOTO_CONTEXTS) -> list[Scene]:
    """Scenes of the subject, cycling through ``contexts``."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, cls=SUBJECT_CLASS, color=SUBJECT, context=contexts[i % len(contexts)])
            for i in range(n)]


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, size, size, 3), anti-aliased (what a camera at lower resolution sees)."""
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS)) for im in images])


__all__ = ["CLASSES", "COLORS", "CONTEXTS", "SUBJECT", "SUBJECT_CLASS", "SUBJECT_PHOTO_CONTEXTS", "Scene",
           "caption", "random_scene", "random_caption", "render", "sample_dataset", "subject_scenes", "downsample", "write_subject_photos", "random_patterns"]


SUBJECT_SEED = 2024  # the seed of the shipped subject photos (assets/toy/subject)


def write_subject_photos(folder, n: int = 5, seed: int = SUBJECT_SEED, size: int = 128) -> list:
    """Render the subject's "photos" (as a user's own would be: PNG files in a folder)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sc in enumerate(subject_scenes(n, seed)):
        p = folder / f"{i:02d}.png"
        Image.fromarray(render(sc, size)).save(p)
        paths.append(p)
    return paths


def random_patterns(n: int, seed: int, size: int = 128) -> np.ndarray:
    """Generic "photos" for the VAE only: random shapes, checkers and stripes in arbitrary colors on
    random gradients. SD's VAE was trained on broad data and can encode any photo; training ours on
    these besides the toy world keeps it from failing on colors and patterns the world lacks (such
    as the subject's) without ever showing it the subject."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = size * 2
        img = Image.new("RGB", (s, s))
        draw = ImageDraw.Draw(img)
        col = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
        _vertical_gradient(draw, (0, 0, s, s), col(), col())
        for _ in range(int(rng.integers(2, 7))):
            x0, y0 = rng.uniform(-0.1, 0.9, 2) * s
            w, h = rng.uniform(0.1, 0.6, 2) * s
            kind = rng.integers(4)
            if kind == 0:
                draw.ellipse([x0, y0, x0 + w, y0 + h], fill=col())
            elif kind == 1:
                draw.polygon([tuple(p) for p in rng.uniform(0, 1, (int(rng.integers(3, 6)), 2)) * s], fill=col())
            else:  # rectangle, plain or with a checker / stripes
                a, b = col(), col()
                cells = int(rng.integers(1, 5))
                for i in range(cells):
                    for k in range(cells):
                        c = a if (kind == 2 and (i + k) % 2 == 0) or (kind == 3 and i % 2 == 0) else b
                        draw.rectangle([x0 + w * i / cells, y0 + h * k / cells,
                                        x0 + w * (i + 1) / cells, y0 + h * (k + 1) / cells], fill=c)
        out.append(np.asarray(img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
                              .resize((size, size), Image.LANCZOS)))
    return np.stack(out)
