"""What to generate: one Generate request, with diffusers' argument names.

``GenerateConfig`` is built from the Generate tab's widgets, from a ``--config`` JSON
file (``python -m studio generate``) or from an image's "parameters" metadata, and
checks itself: sizes are multiples of 8 within limits, the scheduler is one of the
catalogue's names, the seed is -1 (random) or a 32-bit number.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.config.base import MAX_SEED, ConfigBase, option, require, require_choice
from studio.schedulers import DEFAULT_SCHEDULER, SCHEDULER_NAMES

#: Largest width/height accepted (pixels); larger rarely fits any GPU and is a typo.
MAX_SIZE = 4096
#: Largest number of images in one batch and of batches in one request.
MAX_BATCH_SIZE = 16
MAX_BATCH_COUNT = 100
MAX_STEPS = 1000


@dataclass
class GenerateConfig(ConfigBase):
    """One generation request."""

    model: str = option("", "Model: a Hub id (owner/name[@revision][:variant]), a diffusers folder, a .safetensors file or a run folder. Empty uses the loaded model.")
    prompt: str = option("", "What the image should show (ignored by unconditional models).")
    negative_prompt: str = option("", "What the image should not show.")
    width: int = option(0, "Image width in pixels, a multiple of 8; 0 uses the model's native size.")
    height: int = option(0, "Image height in pixels, a multiple of 8; 0 uses the model's native size.")
    num_inference_steps: int = option(25, "Denoising steps: more is slower and usually cleaner.")
    guidance_scale: float = option(7.0, "Classifier-free guidance (CFG scale): how strongly to follow the prompt; 1 turns it off.")
    seed: int = option(-1, "Random seed; -1 picks one (the seed used is shown and saved with the image).")
    batch_size: int = option(1, "Images generated together in one pass.")
    batch_count: int = option(1, "Passes run one after another (each image gets seed, seed+1, ...).")
    scheduler: str = option(DEFAULT_SCHEDULER, "Sampler; only those compatible with the model are offered.")
    lora: str = option("", "Optional LoRA: a .safetensors file or a Fine-tune run folder.")
    lora_scale: float = option(1.0, "How strongly the LoRA applies (0 = not at all).")
    workspace: str = option("", "Headless runs only: folder whose outputs/ receives the images (empty = ./runs). "
                            "The app always uses its own workspace.")
    device: str = option("auto", "Headless runs only: auto, cpu, cuda or mps. The app uses its launch device.")

    def __post_init__(self) -> None:
        for label, value in (("Width", self.width), ("Height", self.height)):
            require(isinstance(value, int) and not isinstance(value, bool),
                    f"{label} must be a whole number of pixels (got {value!r}).")
            require(value == 0 or (8 <= value <= MAX_SIZE and value % 8 == 0),
                    f"{label} must be a multiple of 8 between 8 and {MAX_SIZE} (or 0 for the model's size); "
                    f"got {value}.")
        require(isinstance(self.num_inference_steps, int) and 1 <= self.num_inference_steps <= MAX_STEPS,
                f"Steps must be between 1 and {MAX_STEPS} (got {self.num_inference_steps!r}).")
        require(isinstance(self.guidance_scale, (int, float)) and 0 <= self.guidance_scale <= 50,
                f"Guidance scale must be between 0 and 50 (got {self.guidance_scale!r}).")
        require(isinstance(self.seed, int) and -1 <= self.seed <= MAX_SEED,
                f"Seed must be -1 (random) or between 0 and {MAX_SEED} (got {self.seed!r}).")
        require(isinstance(self.batch_size, int) and 1 <= self.batch_size <= MAX_BATCH_SIZE,
                f"Batch size must be between 1 and {MAX_BATCH_SIZE} (got {self.batch_size!r}).")
        require(isinstance(self.batch_count, int) and 1 <= self.batch_count <= MAX_BATCH_COUNT,
                f"Batch count must be between 1 and {MAX_BATCH_COUNT} (got {self.batch_count!r}).")
        require_choice(self.scheduler, SCHEDULER_NAMES, "Scheduler")
        require(isinstance(self.device, str) and (self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda")),
                f"Device must be auto, cpu, cuda[:N] or mps (got {self.device!r}).")
        require(isinstance(self.lora_scale, (int, float)) and -2 <= self.lora_scale <= 2,
                f"LoRA scale must be between -2 and 2 (got {self.lora_scale!r}).")
        self.guidance_scale = float(self.guidance_scale)
        self.lora_scale = float(self.lora_scale)
        self.model = self.model.strip()
        self.lora = self.lora.strip()

    @property
    def total_images(self) -> int:
        """batch_size x batch_count."""
        return self.batch_size * self.batch_count
