"""The DreamBooth paper's five metrics (section 4.1, Table 1 and Table 3) on embeddings / distances.

Plain numpy on what the encoders return, so each formula can be checked by hand:

* DINO, CLIP-I: mean cosine similarity over every (generated, real) pair of image embeddings;
* CLIP-T: mean cosine similarity between each generated image's CLIP embedding and its prompt's;
* PRES: DINO between images of the class prompt ("a [class]") and the real subject photos (lower
  is better: the subject did not leak into its class);
* DIV: mean LPIPS distance over all pairs of images of the same prompt, averaged over prompts.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dreambooth_jax.errors import ConfigError

#: The paper's numbers to compare with (Table 1: DreamBooth on Stable Diffusion and the real
#: images; Table 3: Imagen with / without the prior-preservation loss).
PAPER = {
    "Table 1, DreamBooth (Stable Diffusion)": {"DINO": 0.668, "CLIP-I": 0.803, "CLIP-T": 0.305},
    "Table 1, real images": {"DINO": 0.774, "CLIP-I": 0.885},
    "Table 3, Imagen with prior preservation": {"PRES": 0.493, "DIV": 0.391},
    "Table 3, Imagen without prior preservation": {"PRES": 0.664, "DIV": 0.371},
}
METRICS = ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {x.shape}")
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pairwise_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity over all N x M pairs of rows of a (N, D) and b (M, D): DINO, CLIP-I,
    PRES (float64 accumulation)."""
    return float(np.mean(_unit(a) @ _unit(b).T))


def matched_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of row i of a with row i of b: CLIP-T (image i with its prompt)."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"matched embeddings must have equal shapes, got {np.shape(a)} and {np.shape(b)}")
    return float(np.mean(np.sum(_unit(a) * _unit(b), axis=-1)))


def pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j), i < j, of every unordered pair of n images (DIV compares each pair once)."""
    if n < 2:
        raise ValueError("DIV needs at least two images per prompt")
    return np.triu_indices(n, k=1)


def diversity(distances_per_prompt: list[np.ndarray]) -> float:
    """DIV: the mean over prompts of the mean LPIPS distance over the pairs of that prompt's images."""
    return float(np.mean([np.mean(d) for d in distances_per_prompt]))


# ----------------------------------------------------------------------------- prompts
# The paper's evaluation prompts (google/dreambooth dataset, prompts_and_classes.txt, CC BY 4.0):
# 20 recontextualisations + 5 property modifications for objects; for live subjects (cats, dogs)
# the last 15 are accessorisations and property changes.
_CONTEXTS = ["in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
             "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
             "with a blue house in the background", "on top of a purple rug in a forest"]
OBJECT_PROMPTS = [f"a {{0}} {{1}} {c}" for c in _CONTEXTS] + [
    "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug", "a red {0} {1}", "a purple {0} {1}",
    "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}"]
LIVE_PROMPTS = [f"a {{0}} {{1}} {c}" for c in _CONTEXTS] + [
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit", "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses", "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit", "a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}",
    "a cube shaped {0} {1}"]
LIVE_CLASSES = ("cat", "dog")  # the paper's live subjects


def paper_prompts(class_noun: str) -> list[str]:
    """The paper's 25 prompt templates for this class ({0}: identifier, {1}: class noun)."""
    return list(LIVE_PROMPTS if class_noun.strip().lower() in LIVE_CLASSES else OBJECT_PROMPTS)


_FORMAT_LINE = re.compile(r"""^\s*['"](?P<t>.*)['"]\s*\.format\(.*\)\s*,?\s*$""")


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompt templates from a file: one per line with ``{0}``/``{identifier}`` for the identifier
    and ``{1}``/``{class}`` for the class noun (or ``[V]`` / ``[class]``); blank lines and ``#``
    comments are skipped; lines in the paper file's ``'a {0} {1} ...'.format(...)`` form are read
    as their template."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        m = _FORMAT_LINE.match(line)
        text = m["t"] if m else line.strip()
        if not text or text.startswith("#") or (not m and ("prompt_list" in text or text in ("]", "["))):
            continue
        t = (text.replace("{identifier}", "{0}").replace("{class}", "{1}").replace("[V]", "{0}")
             .replace("[class]", "{1}"))
        if "{0}" not in t:
            raise ConfigError(f"--prompts {path}, line {n}: {text!r} has no identifier placeholder "
                              "({0}, {identifier} or [V]): it would not prompt the subject")
        out.append(t)
    if not out:
        raise ConfigError(f"--prompts {path}: no prompts in the file")
    return out


def fill(template: str, identifier: str, class_noun: str) -> str:
    """A template with the identifier and class noun put in."""
    return template.replace("{0}", identifier).replace("{1}", class_noun)


def clip_t_text(template: str, class_noun: str) -> str:
    """The text CLIP-T compares an image with: the prompt without the rare identifier, which means
    nothing to CLIP ("a sks dog in the snow" -> "a dog in the snow")."""
    return " ".join(fill(template, "", class_noun).split())
