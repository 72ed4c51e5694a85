"""Starting a DDPM run from pretrained weights (``TrainConfig.init_from``).

``init_from`` names a pretrained unconditional DDPM: a bundled model
(``bundled:emoji-ddpm``, see ``studio.bundled``), a run of the workspace (its
``model/``), or a ``DDPMPipeline`` folder. ``resolve_init_from`` turns that into the
pipeline folder, confined to the workspace or the bundled models; ``read_ddpm_configs``
reads its UNet and scheduler JSON (no torch, so ``TrainConfig`` can take the
architecture from it); ``noise_schedule`` is the noise schedule its weights were trained
with, which the run keeps (``TrainConfig`` takes it: the model's timesteps, betas and
prediction type replace the run's, and the trainer says so); ``load_unet_weights`` copies
its weights, from safetensors only, into the freshly built UNet of the run, refusing
anything that does not fit exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio.bundled import MODELS_DIR, PREFIX, bundled_models, find_bundled
from studio.errors import ConfigError

#: Weights file of a diffusers UNet folder.
WEIGHTS = "diffusion_pytorch_model.safetensors"
#: Config keys that only record where and how a model was saved.
_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
#: The noise-schedule settings a run keeps from its pretrained model, with the value diffusers' DDPMScheduler
#: and DDIMScheduler read when a scheduler_config.json leaves one out (``tests/test_pretrained.py`` checks them).
SCHEDULE_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                     "prediction_type": "epsilon"}


def resolve_init_from(reference: str, workspace: str | Path) -> Path:
    """The pipeline folder ``reference`` names.

    Args:
        reference: ``bundled:<name>`` (or a bundled name), a run name of ``workspace``, or a
            folder (a run folder or a pipeline folder) inside ``workspace``.
        workspace: The workspace folder; paths outside it (and outside the bundled models) are refused.

    Raises:
        ConfigError: unknown name, a path outside the workspace, or a folder that is not a
            DDPM pipeline with safetensors weights.
    """
    text = (reference or "").strip()
    root = Path(workspace).expanduser()
    bundled = find_bundled(text)
    if bundled is not None and (text.startswith(PREFIX) or not (root / text).exists()):
        return _check_pipeline(bundled.path, text)
    if text.startswith(PREFIX):
        names = ", ".join(m.reference for m in bundled_models("ddpm")) or "none"
        raise ConfigError(f"No bundled model named {text[len(PREFIX):]!r} (bundled DDPM models: {names}).")
    path = Path(text).expanduser()
    if not path.is_absolute() and not path.exists():
        path = root / text
    if not path.exists():
        raise ConfigError(f"Start-from model not found: {text}.",
                          "Give bundled:emoji-ddpm, a run name of this workspace, or a DDPMPipeline folder in it.")
    resolved = path.resolve()
    allowed = (root.resolve(), MODELS_DIR.resolve())
    if not any(resolved.is_relative_to(base) for base in allowed):
        raise ConfigError(f"Start-from model {resolved} is outside the workspace ({root.resolve()}).",
                          "Copy the model folder into the workspace and pick it from there.")
    if (resolved / "model" / "model_index.json").is_file():  # a run folder
        resolved = resolved / "model"
    return _check_pipeline(resolved, text)


def _check_pipeline(folder: Path, text: str) -> Path:
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"{text} is not a diffusers pipeline folder (no model_index.json); a run must have "
                          "finished (exported model/) to start from it.")
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{text}: model_index.json cannot be read ({exc}).") from None
    if index.get("_class_name") not in ("DDPMPipeline", "DDIMPipeline"):
        raise ConfigError(f"{text} is a {index.get('_class_name')}, not an unconditional DDPM; "
                          "Train starts only from a DDPMPipeline (use Fine-tune for text-to-image models).")
    unet = folder / "unet"
    if not (unet / "config.json").is_file():
        raise ConfigError(f"{text} has no unet/config.json.")
    if not (unet / WEIGHTS).is_file():
        pickled = any(unet.glob("*.bin")) or any(unet.glob("*.ckpt"))
        raise ConfigError(f"{text} has no unet/{WEIGHTS}" + (" (only pickle weights, which can run code when "
                                                            "loaded, and are refused)" if pickled else "") + ".",
                          "Re-save the pipeline with save_pretrained(..., safe_serialization=True).")
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object.")
    return data


def read_ddpm_configs(reference: str, workspace: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(UNet config, scheduler config) of the pretrained DDPM ``reference`` names (torch-free).

    Raises:
        ConfigError: as ``resolve_init_from``, or unreadable configs.
    """
    folder = resolve_init_from(reference, workspace)
    unet = _read_json(folder / "unet" / "config.json")
    if unet.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"{reference}'s UNet is a {unet.get('_class_name')}; Train starts only from a UNet2DModel.")
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if not isinstance(unet.get(key), list):
            raise ConfigError(f"{reference}'s unet/config.json has no {key}.")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else {}
    return unet, scheduler


def noise_schedule(scheduler: dict[str, Any], reference: str) -> dict[str, Any]:
    """The noise schedule the pretrained DDPM ``reference`` was trained with, from its scheduler config
    (``read_ddpm_configs``): ``SCHEDULE_DEFAULTS``' keys, diffusers' defaults for those it leaves out.

    Its weights denoise at that schedule's noise levels and predict that target, so a run starting from
    it keeps the schedule rather than its own settings (another one would train them on the wrong task).

    Raises:
        ConfigError: no scheduler config (the schedule is unknown), or a schedule the studio's trainer
            cannot reproduce (its own betas, zero-terminal-SNR rescaling, a beta schedule or target it
            does not offer).
    """
    from studio.config.train import BETA_SCHEDULES, PREDICTION_TYPES

    if not scheduler:
        raise ConfigError(f"{reference} has no scheduler/scheduler_config.json, so the noise schedule its weights "
                          "were trained with is unknown.",
                          "Save the model with its scheduler (DDPMPipeline.save_pretrained writes it), or train "
                          "from scratch.")
    schedule = {name: scheduler.get(name, default) for name, default in SCHEDULE_DEFAULTS.items()}
    cannot = []
    if scheduler.get("trained_betas") is not None:
        cannot.append("its own list of betas (trained_betas)")
    if scheduler.get("rescale_betas_zero_snr"):
        cannot.append("zero-terminal-SNR rescaling (rescale_betas_zero_snr)")
    if schedule["beta_schedule"] not in BETA_SCHEDULES:
        cannot.append(f"beta_schedule {schedule['beta_schedule']!r}")
    if schedule["prediction_type"] not in PREDICTION_TYPES:
        cannot.append(f"prediction_type {schedule['prediction_type']!r}")
    numbers = [schedule[k] for k in ("num_train_timesteps", "beta_start", "beta_end")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) or \
            not (int(numbers[0]) == numbers[0] >= 2 and 0 < numbers[1] < numbers[2] < 1):
        cannot.append(f"num_train_timesteps {numbers[0]!r}, beta_start {numbers[1]!r}, beta_end {numbers[2]!r}")
    if cannot:
        raise ConfigError(f"{reference} was trained with a noise schedule the Train tab cannot reproduce "
                          f"({'; '.join(cannot)}), so its weights cannot be trained further here.",
                          "Start from another model, or train from scratch.")
    schedule["num_train_timesteps"] = int(schedule["num_train_timesteps"])
    return schedule


def schedule_text(schedule: dict[str, Any]) -> str:
    """A noise schedule in words: "1000 timesteps, linear betas 0.0001 to 0.02, v_prediction target"."""
    betas = schedule["beta_schedule"] if schedule["beta_schedule"] == "squaredcos_cap_v2" else \
        f"{schedule['beta_schedule']} betas {schedule['beta_start']:g} to {schedule['beta_end']:g}"
    return f"{schedule['num_train_timesteps']} timesteps, {betas}, {schedule['prediction_type']} target"


def load_unet_weights(unet: Any, reference: str, workspace: str | Path) -> Path:
    """Copy the pretrained UNet's weights (safetensors) into ``unet``; returns the pipeline folder.

    The run's UNet was built from the architecture ``TrainConfig`` took from the same
    model; anything else in the model's config that differs (a setting the studio's
    architecture fields do not cover) or any weight that does not fit is refused.

    Raises:
        ConfigError: a config setting or weights that do not match the run's UNet.
    """
    from safetensors.torch import load_file

    folder = resolve_init_from(reference, workspace)
    theirs = _read_json(folder / "unet" / "config.json")
    if theirs.get("attention_head_dim", 0) is None:  # older diffusers wrote None for the default 8
        theirs["attention_head_dim"] = 8
    ours = dict(unet.config)
    differ = sorted(k for k, v in theirs.items()
                    if k not in _BOOKKEEPING and k in ours and _norm(v) != _norm(ours[k]))
    if differ:
        raise ConfigError(f"{reference}'s UNet uses settings the Train tab cannot reproduce "
                          f"({', '.join(differ)} differ), so its weights would not mean the same.",
                          "Start from a model trained with the studio, or train from scratch.")
    weights = load_file(str(folder / "unet" / WEIGHTS))
    try:
        missing, unexpected = unet.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ConfigError(f"{reference}'s weights do not fit the run's UNet: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise ConfigError(f"{reference}'s weights do not fit the run's UNet ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected tensors).")
    return folder


def _norm(value: Any) -> Any:
    return [_norm(v) for v in value] if isinstance(value, (list, tuple)) else value


def init_from_choices(workspace: str | Path) -> list[tuple[str, str]]:
    """(label, value) pairs for the Train tab's "Start from" list: scratch, bundled DDPMs, finished Train runs."""
    from studio.runs import list_runs

    choices = [("from scratch (random weights)", "")]
    choices += [(f"{m.name} ({m.description})", m.reference) for m in bundled_models("ddpm")]
    choices += [(f"run: {r.name}", r.name) for r in list_runs(workspace) if r.task == "train" and r.has_model]
    return choices
