"""Model cards and exported metadata that follow the Hugging Face Hub's conventions.

Responsible for the ``README.md`` beside every exported model (a Train run's DDPM, a
Fine-tune's LoRA or pipeline) and for keeping local paths out of what is exported:

- YAML front matter written by ``huggingface_hub.ModelCardData``: ``license`` (the base
  model's, read from its card; for a model trained from scratch, the dataset's when the
  studio knows it; else ``other`` with a line saying to set it), ``library_name``,
  ``pipeline_tag``, ``base_model`` only when the base is a Hub id (never a path, never
  ``id@rev:variant``), ``tags``, ``instance_prompt`` for DreamBooth;
- usage snippets that run when pasted in the model's folder (``"."``) or, once pushed,
  by its Hub id, with the base model by Hub id (revision and variant as arguments);
- ``public_name`` for what a card or metadata says about a model (a Hub id, else a name),
  and ``scrub_local_paths`` for the ``_name_or_path`` diffusers writes into configs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Licences of the studio's bundled datasets (DataConfig.source -> Hub licence id).
DATA_LICENSES = {"emoji": "cc-by-4.0"}  # Twemoji graphics; assets/emoji/LICENSE.md
STUDIO_TAG = "diffusion-studio"

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
                     r"(?:@(?P<revision>[A-Za-z0-9._/-]+?))?(?::(?P<variant>[A-Za-z0-9_-]+))?$")


@dataclass(frozen=True)
class HubBase:
    """A base model named by Hub id: the repo, and the revision/variant the studio loaded."""

    repo: str
    revision: str | None = None
    variant: str | None = None


def hub_base(reference: str) -> HubBase | None:
    """The Hub id in a model reference (``owner/name[@rev][:variant]``), or None for anything local."""
    text = str(reference or "").strip()
    match = _HUB_ID.match(text)
    if match is None or Path(text).expanduser().exists():
        return None
    return HubBase(match["repo"], match["revision"], match["variant"])


def public_name(reference: str) -> str:
    """What a card may say a model is: its Hub id, else a name (a run's, a folder's or file's stem)."""
    text = str(reference or "").strip()
    if hub_base(text) is not None:
        return text
    if text.startswith("bundled:"):
        return text[len("bundled:"):]
    path = Path(text)
    if path.name in ("model", "lora") and (path.parent / "config.json").is_file():
        path = path.parent
    return path.stem if path.suffix in (".safetensors", ".ckpt", ".pt", ".bin") else (path.name or text)


def readme_license(folder: str | Path) -> str | None:
    """The ``license`` in a model folder's README.md front matter, if it has one."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(path).data.license
    except Exception:  # a README without (valid) front matter says nothing about the licence
        return None
    return str(value) if value else None


def base_license(reference: str, workspace: str | Path | None = None) -> str | None:
    """The licence of the model a fine-tune started from (its card's), or None when unknown.

    A Hub base's README.md comes from the cache, or from the Hub unless offline; a local
    folder, bundled model or workspace run is read from disk.
    """
    base = hub_base(reference)
    if base is None:
        folder = _local_folder(reference, workspace)
        return readme_license(folder) if folder is not None else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from studio.model_refs import is_offline

    hit = try_to_load_from_cache(base.repo, "README.md", revision=base.revision)
    if not isinstance(hit, str) and not is_offline():
        try:
            hit = hf_hub_download(base.repo, "README.md", revision=base.revision, etag_timeout=5)
        except Exception:  # no card, gated, unreachable: the licence stays unknown
            hit = None
    return readme_license(Path(hit).parent) if isinstance(hit, str) else None


def _local_folder(reference: str, workspace: str | Path | None) -> Path | None:
    from studio.bundled import find_bundled

    bundled = find_bundled(reference)
    if bundled is not None:
        return Path(bundled.path)
    path = Path(reference).expanduser()
    if not path.exists() and workspace is not None:
        path = Path(workspace) / reference
    if (path / "model" / "model_index.json").is_file():
        return path / "model"
    return path if path.is_dir() else None


def front_matter(license: str | None, pipeline_tag: str, tags: list[str], base: HubBase | None = None,
                 **extra: Any) -> str:
    """The card's YAML block (``---`` lines included), written by huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(license=license or "other", library_name="diffusers", pipeline_tag=pipeline_tag,
                         base_model=base.repo if base is not None else None, tags=tags,
                         **{k: v for k, v in extra.items() if v})
    return f"---\n{data.to_yaml()}\n---\n"


def license_line(license: str | None) -> str:
    """A sentence for the body when the licence could not be found."""
    if license:
        return ""
    return ("Licence: `other` — the studio could not read the licence of the base model or data; set `license:` "
            "above to theirs before publishing.\n")


def from_pretrained_call(cls: str, source: str, base: HubBase | None = None) -> str:
    """``Cls.from_pretrained("source", revision=..., variant=...)`` as code."""
    args = [json.dumps(source)]
    if base is not None and base.revision:
        args.append(f"revision={json.dumps(base.revision)}")
    if base is not None and base.variant:
        args.append(f"variant={json.dumps(base.variant)}")
    return f"{cls}.from_pretrained({', '.join(args)})"


def this_model(hub_model_id: str = "") -> tuple[str, str]:
    """(source, comment) for the exported model itself in a snippet: its Hub id, else this folder."""
    if hub_model_id.strip():
        return hub_model_id.strip(), ""
    return ".", "  # this folder: run from here, or put the Hub id here once uploaded"


def base_source(reference: str, card_folder: Path, workspace: str | Path | None = None) -> tuple[str, HubBase | None]:
    """(what a snippet loads the base from, its HubBase): the Hub id, else a path relative to the card."""
    base = hub_base(reference)
    if base is not None:
        return base.repo, base
    folder = _local_folder(reference, workspace)
    target = folder if folder is not None else Path(reference)
    try:
        return os.path.relpath(Path(target).resolve(), Path(card_folder).resolve()), None
    except ValueError:  # another drive on Windows
        return public_name(reference), None


def scrub_local_paths(folder: str | Path) -> list[Path]:
    """Drop the local ``_name_or_path`` diffusers/transformers write into an exported folder's JSON files.

    A Hub id there is kept (it says where the weights came from); a path is removed.
    Returns the files changed.
    """
    changed = []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        value = data.get("_name_or_path")
        if isinstance(value, str) and value and hub_base(value) is None:
            del data["_name_or_path"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            changed.append(path)
    return changed


def public_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A config dict for a card: every absolute path replaced by its name."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
            return public_name(value)
        return value

    return clean(settings)


# --------------------------------------------------------------------------- the cards
def finetune_card(folder: Path, cfg: Any, run: Any, step: int, samples: list[str], sdxl: bool = False) -> str:
    """README.md text for a Fine-tune's ``lora/`` or ``model/`` folder.

    Args:
        folder: Where the card goes (the snippet's paths are relative to it).
        cfg: The ``FinetuneConfig``.
        run: The ``RunDir``.
        step: Steps trained.
        samples: Markdown lines showing the validation images copied beside the card.
        sdxl: Whether the base is SDXL.
    """
    from studio.config.finetune import METHOD_HELP

    reference = cfg.pretrained_model_name_or_path
    license = base_license(reference, cfg.workspace or run.root.parent)
    cls = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    tags = ["diffusers", "text-to-image", "stable-diffusion-xl" if sdxl else "stable-diffusion", STUDIO_TAG]
    tags += (["lora"] if cfg.is_lora else []) + (["dreambooth"] if cfg.is_dreambooth else [])
    source, base = base_source(reference, folder, cfg.workspace or run.root.parent)
    mine, comment = this_model(cfg.hub_model_id if cfg.push_to_hub else "")
    prompt = (cfg.validation_prompts[0] if cfg.validation_prompts else "") or cfg.trigger_words or "a picture"
    base_comment = "" if base is not None else "  # the base model on the machine that trained this"
    if cfg.is_lora:
        load = [f"pipe = {from_pretrained_call(cls, source, base)}{base_comment}",
                f'pipe.load_lora_weights({json.dumps(mine)}, weight_name="pytorch_lora_weights.safetensors"){comment}']
    else:
        load = [f"pipe = {from_pretrained_call(cls, mine)}{comment}"]
    usage = "\n".join(["```python", f"from diffusers import {cls}", "", *load,
                       f"image = pipe({json.dumps(prompt)}, num_inference_steps=25).images[0]",
                       'image.save("example.png")', "```"])
    kind = "LoRA" if cfg.is_lora else "fine-tuned pipeline"
    settings = public_settings({k: v for k, v in cfg.to_dict().items()
                                if k not in ("data", "workspace", "resume", "run_name")})
    lines = [
        front_matter(license, "text-to-image", tags, base,
                     instance_prompt=cfg.instance_prompt.strip() if cfg.is_dreambooth else None),
        f"# {run.name}: {kind} of {public_name(reference)}",
        "",
        f"Method: **{cfg.method}** — {METHOD_HELP[cfg.method]} Trained {step} steps on "
        f"{public_data_label(cfg.data)} at {cfg.resolution} px with Diffusion Studio.",
        "",
        f"Trigger words: `{cfg.trigger_words}`" if cfg.trigger_words else "Trigger words: none (trained on captions).",
        "",
        license_line(license),
        "## Validation images (fixed seed)",
        "",
        *samples,
        "",
        "## Use",
        "",
        usage,
        "",
        "" if not cfg.is_lora else
        f"The kohya/A1111 file `{run.name}-kohya.safetensors` loads in AUTOMATIC1111, ComfyUI and kohya's scripts.",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def public_data_label(data: Any) -> str:
    """DataConfig.label without a local path: 'emoji (bundled)', 'hub user/set', 'folder cats'."""
    if data.source in ("emoji", "hub"):
        return data.label
    return f"{data.source} {public_name(str(data.path))}" if getattr(data, "path", "") else data.label


def ddpm_card(run: Any, cfg: Any, step: int, total: int, world: int, params: int, ema: bool) -> str:
    """README.md text for a Train run's ``model/`` (an unconditional DDPMPipeline)."""
    license = DATA_LICENSES.get(cfg.data.source)
    table = [
        ("dataset", public_data_label(cfg.data)),
        ("resolution", f"{cfg.resolution} px"),
        ("steps", f"{step} of {total}"),
        ("batch size", f"{cfg.train_batch_size} x {cfg.gradient_accumulation_steps} accumulation x {world} "
                       "process(es)"),
        ("learning rate", f"{cfg.learning_rate} ({cfg.lr_scheduler}, {cfg.lr_warmup_steps} warm-up steps)"),
        ("UNet", f"block_out_channels {tuple(cfg.block_out_channels)}, layers_per_block {cfg.layers_per_block}, "
                 f"{params:,} parameters"),
        ("noise schedule", f"{cfg.num_train_timesteps} timesteps, {cfg.beta_schedule}, predicts {cfg.prediction_type}"),
        ("weights", "EMA" if ema else "final"),
    ]
    return "\n".join([
        front_matter(license, "unconditional-image-generation", ["diffusers", "ddpm",
                                                                 "unconditional-image-generation", STUDIO_TAG]),
        f"# {run.name}",
        "",
        "An unconditional DDPM trained from scratch with Diffusion Studio.",
        "",
        license_line(license),
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in table),
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import DDIMScheduler, DDPMPipeline",
        "",
        f"pipe = {from_pretrained_call('DDPMPipeline', '.')}  # this folder: run from here, or its Hub id once "
        "uploaded",
        "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # 50 steps instead of 1000",
        "images = pipe(batch_size=4, num_inference_steps=50).images",
        'images[0].save("example.png")',
        "```",
        "",
        "Training configuration: `../config.json`; loss history: `../events.jsonl`.",
        "",
    ])
