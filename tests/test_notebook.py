"""notebooks/dreambooth.ipynb runs end to end, headless, on the shipped toy world: the parameters
cell is overridden as papermill does it (toy prior and SR model, toy subject, the fewest steps),
and the run must leave the class images, the validation grid shown inline, the base and SR samples
and the export. The stored notebook itself must hold no outputs (never stale ones)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from dreambooth_jax.demo import TOY_PRIOR, TOY_SR, TOY_SUBJECT

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "dreambooth.ipynb"


def ci_parameters(out: Path, copy_to: Path) -> dict:
    """The cheapest run that still passes every stage: 2 class images of 2 steps, 2 LoRA steps at
    32 px with a validation grid after each, 2 prompts x 2 samples of 2 steps, one SR image each."""
    return dict(
        MODEL=str(TOY_PRIOR), SR_MODEL=str(TOY_SR), TRAIN_SR=False, PHOTOS=str(TOY_SUBJECT),
        IDENTIFIER="sks", CLASS_NOUN="box", INSTANCE_PROMPT="a photo of a sks box", CLASS_PROMPT="a photo of a box",
        CONTEXTS=["on the beach", "in the snow"], METHOD="lora",
        TRAIN_OVERRIDES=dict(num_class_images=2, class_steps=2, class_guidance=5.0, resolution=32, flip=False,
                             max_train_steps=2, learning_rate=5e-3, validation_every=1,
                             validation_steps=2, checkpoint_every=2, log_every=1),
        SAMPLES_PER_PROMPT=2, SR_PER_PROMPT=1, SAMPLE_STEPS=2, SR_STEPS=2, GUIDANCE=5.0, SR_GUIDANCE=5.0,
        OUTPUT_DIR=str(out), EXPORT="all", COPY_TO=str(copy_to), DOWNLOAD=False,
    )


def inject_parameters(nb, params: dict) -> None:
    """What papermill does: a cell after the one tagged ``parameters`` that assigns the overrides."""
    import nbformat

    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def test_stored_notebook_is_clean():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be the parameters cell"
    stale = [c.id for c in code if c.outputs or c.execution_count is not None]
    assert not stale, f"the stored notebook must hold no outputs (cells {stale}); clear them before committing"
    # every parameter the CI run overrides exists in the parameters cell (a rename would go unnoticed)
    names = {line.split("=")[0].strip() for line in code[0].source.splitlines() if "=" in line and line[0].isupper()}
    missing = set(ci_parameters(Path("o"), Path("c"))) - names
    assert not missing, missing


def test_notebook_runs_headless_on_the_toy_world(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    from PIL import Image

    out, copy_to = tmp_path / "out", tmp_path / "drive"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(nb, ci_parameters(out, copy_to))
    # The kernel inherits the environment: one CPU device, as on a CPU runtime (make test asks for 8),
    # and the notebook's compilation cache in tmp_path rather than in the home folder.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    monkeypatch.setenv("DREAMBOOTH_JAX_CACHE", str(tmp_path / "xla_cache"))
    # cwd: the notebook's folder, inside this checkout, so the install cell installs nothing
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    assert len(list((out / "class_images").glob("0*.png"))) == 2
    cells = {c.get("id"): c for c in nb.cells}
    train_images = [o for o in cells["train"].outputs if "image/png" in o.get("data", {})]
    assert len(train_images) == 2, "the validation grids (steps 1 and 2) must be shown inline while training"
    # 2 prompts x 2 samples at 32 px; the SR stage: one 128 px image per prompt, a column per prompt
    assert Image.open(out / "samples" / "base.png").size == (64, 64)
    assert Image.open(out / "samples" / "sr.png").size == (256, 128)
    assert len(list((out / "samples").glob("sr_*.png"))) == 2
    assert any("image/png" in o.get("data", {}) for o in cells["sample"].outputs)
    archive = out / "export" / "dreambooth-sks-box-all.zip"
    names = set(zipfile.ZipFile(archive).namelist())
    for f in ("model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors",
              "lora/pytorch_lora_weights.safetensors", "lora/lora_kohya.safetensors"):
        assert f in names, (f, sorted(names))
    assert (copy_to / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((copy_to / "model" / "unet" / "config.json").read_text())
