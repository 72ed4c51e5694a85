"""The one table of models that ship with the studio (under ``assets/models/``).

A bundled model is a diffusers pipeline folder in the repository: it loads offline
with no download, the Generate tab lists it first, and the Train tab can start from
it (``TrainConfig.init_from``). A model reference ``bundled:<name>`` (or the bare name,
when no file or run of that name exists) names one. Later bundled models join
``BUNDLED_MODELS``; nothing else needs to change.

Torch-free: this module only knows names and folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The folder holding every bundled model.
MODELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"
#: Prefix of a bundled model reference: ``bundled:emoji-ddpm``.
PREFIX = "bundled:"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped in ``assets/models/<name>``.

    Attributes:
        name: Folder name and reference (``bundled:<name>``).
        kind: What it is: "sd" (text-to-image StableDiffusionPipeline) or "ddpm" (unconditional DDPMPipeline).
        description: Short text for the dropdowns.
    """

    name: str
    kind: str
    description: str

    @property
    def path(self) -> Path:
        return MODELS_DIR / self.name

    @property
    def reference(self) -> str:
        return PREFIX + self.name

    @property
    def available(self) -> bool:
        """Whether the folder holds a pipeline (a checkout without the weights has none)."""
        return (self.path / "model_index.json").is_file()


#: Every bundled model, in the order the dropdowns list them.
BUNDLED_MODELS: dict[str, BundledModel] = {m.name: m for m in (
    BundledModel("emoji-sd", "sd", "bundled, text-to-image emoji 32 px (tiny Stable Diffusion), loads offline"),
    BundledModel("emoji-ddpm", "ddpm", "bundled, unconditional emoji faces 32 px, loads offline"),
)}


def bundled_models(kind: str | None = None) -> list[BundledModel]:
    """The bundled models present on disk (of ``kind`` when given), in table order."""
    return [m for m in BUNDLED_MODELS.values() if m.available and (kind is None or m.kind == kind)]


def find_bundled(reference: str) -> BundledModel | None:
    """The bundled model ``reference`` names (``bundled:<name>`` or ``<name>``), or None."""
    text = (reference or "").strip()
    name = text[len(PREFIX):] if text.startswith(PREFIX) else text
    model = BUNDLED_MODELS.get(name)
    return model if model is not None and model.available else None
