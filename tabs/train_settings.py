"""The Train tab's settings column as plain data and functions: the widgets (``FIELDS``, ``SECTIONS``),
which show in which mode and how a mode switch changes them (``mode_changes``: the other mode's widgets
hide, shared ones take this mode's label, help and default unless the person typed a value), preset
filling, widget values -> ``TrainConfig`` / ``TextToImageConfig`` (``build_config``) and the model
summary. ``tabs.train`` lays them out and re-exports them; nothing here imports torch or needs Gradio
running.
"""

from __future__ import annotations

import typing
from typing import Any

from studio.config.text_to_image import MODE as TEXT_TO_IMAGE
from studio.config.text_to_image import PREDICTION_TYPES as TEXT_TO_IMAGE_PREDICTIONS
from studio.config.text_to_image import TRAIN_MODES, TextToImageConfig
from studio.config.train import BETA_SCHEDULES, LR_SCHEDULERS, MIXED_PRECISIONS, PREDICTION_TYPES, TrainConfig
from studio.context import StudioContext
from studio.errors import ConfigError, StudioError
from studio.pretrained import schedule_text
from studio.unet_presets import (CUSTOM, PRESET_TRAINING_FIELDS, PRESETS, attention_levels_of, block_types,
                                 human_count, parameter_count, preset_matching)
from tabs.jobtab import field_label, parse_values, same_value

#: How the Mode dropdown names each mode.
MODE_LABELS = {"unconditional": "unconditional (DDPM on images)",
               TEXT_TO_IMAGE: "text-to-image (small Stable Diffusion on captions)"}

#: (field, widget kind, widget options). Kinds: text, int, float, bool, choice, csv (comma list),
#: lines (one item per line), pretrained.
FIELDS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mode", "choice", {"label": "Mode", "choices": [(MODE_LABELS[m], m) for m in TRAIN_MODES]}),
    ("run_name", "text", {"label": "Run name", "placeholder": "empty: train-<date>-<time>"}),
    ("preset", "choice", {"label": "UNet preset", "choices": [*PRESETS, CUSTOM]}),
    ("init_from", "pretrained", {"label": "Start from (pretrained DDPM)"}),
    ("resolution", "int", {"label": "Resolution (px)", "minimum": 8}),
    ("train_batch_size", "int", {"label": "Batch size", "minimum": 1}),
    ("max_train_steps", "int", {"label": "Training steps", "minimum": 0}),
    ("num_epochs", "int", {"label": "Epochs (used when steps is 0)", "minimum": 0}),
    ("learning_rate", "float", {"label": "Learning rate"}),
    ("lr_scheduler", "choice", {"label": "LR schedule", "choices": list(LR_SCHEDULERS)}),
    ("lr_warmup_steps", "int", {"label": "Warm-up steps", "minimum": 0}),
    ("gradient_accumulation_steps", "int", {"label": "Gradient accumulation", "minimum": 1}),
    ("adam_beta1", "float", {"label": "AdamW beta1"}),
    ("adam_beta2", "float", {"label": "AdamW beta2"}),
    ("adam_weight_decay", "float", {"label": "AdamW weight decay"}),
    ("adam_epsilon", "float", {"label": "AdamW epsilon"}),
    ("max_grad_norm", "float", {"label": "Gradient clipping"}),
    ("mixed_precision", "choice", {"label": "Mixed precision", "choices": list(MIXED_PRECISIONS)}),
    ("num_train_timesteps", "int", {"label": "num_train_timesteps", "minimum": 2}),
    ("beta_schedule", "choice", {"label": "beta_schedule", "choices": list(BETA_SCHEDULES)}),
    ("prediction_type", "choice", {"label": "prediction_type", "choices": list(PREDICTION_TYPES)}),
    ("snr_gamma", "float", {"label": "Min-SNR gamma (0 = off)"}),
    ("noise_offset", "float", {"label": "Noise offset"}),
    ("random_flip", "bool", {"label": "Random horizontal flip"}),
    ("center_crop", "bool", {"label": "Center crop"}),
    ("use_ema", "bool", {"label": "EMA weights"}),
    ("ema_max_decay", "float", {"label": "EMA max decay"}),
    ("ema_power", "float", {"label": "EMA power"}),
    ("ema_inv_gamma", "float", {"label": "EMA inverse gamma"}),
    ("ema_update_after_step", "int", {"label": "EMA starts after step", "minimum": 0}),
    ("seed", "int", {"label": "Seed", "minimum": 0}),
    ("sample_every", "int", {"label": "Sample grid every N steps", "minimum": 0}),
    ("num_samples", "int", {"label": "Images per sample grid", "minimum": 1, "maximum": 64}),
    ("sample_inference_steps", "int", {"label": "Sampling steps (DDIM)", "minimum": 1}),
    ("save_every", "int", {"label": "Checkpoint every N steps", "minimum": 0}),
    ("checkpoints_total_limit", "int", {"label": "Checkpoints kept", "minimum": 1}),
    ("block_out_channels", "csv", {"label": "block_out_channels", "placeholder": "32, 64, 64"}),
    ("layers_per_block", "int", {"label": "layers_per_block", "minimum": 1}),
    ("attention_levels", "csv", {"label": "Attention at levels (1 = highest resolution)", "placeholder": "2"}),
    ("attention_head_dim", "int", {"label": "attention_head_dim", "minimum": 1}),
    ("validation_prompts", "lines", {"label": "Validation prompts (one per line: one grid row each)", "lines": 4}),
    ("vae_steps", "int", {"label": "Autoencoder steps (trained first)", "minimum": 1}),
    ("caption_dropout", "float", {"label": "Caption dropout (for guidance)"}),
    ("guidance_scale", "float", {"label": "Guidance scale of the validation images"}),
    ("images_per_prompt", "int", {"label": "Validation images per prompt", "minimum": 1, "maximum": 16}),
    ("vae_learning_rate", "float", {"label": "Autoencoder learning rate"}),
)
#: Widgets only the text-to-image mode reads (``TextToImageConfig``; its model sizes are the config's defaults).
TEXT_TO_IMAGE_FIELDS = ("validation_prompts", "vae_steps", "caption_dropout", "guidance_scale", "images_per_prompt",
                        "vae_learning_rate")
#: Widgets the text-to-image mode shares with the unconditional one (same field names in both configs).
SHARED_FIELDS = ("run_name", "resolution", "train_batch_size", "max_train_steps", "learning_rate", "lr_scheduler",
                 "lr_warmup_steps", "adam_weight_decay", "max_grad_norm", "mixed_precision", "prediction_type",
                 "random_flip", "center_crop", "use_ema", "ema_max_decay", "ema_power", "seed", "sample_every",
                 "sample_inference_steps", "save_every", "checkpoints_total_limit")
#: Widget names in the order the event handlers receive them.
INPUT_NAMES = tuple(name for name, _, _ in FIELDS)
#: Widgets only the unconditional mode reads: hidden in mode text-to-image.
UNCONDITIONAL_FIELDS = tuple(name for name in INPUT_NAMES
                             if name != "mode" and name not in SHARED_FIELDS and name not in TEXT_TO_IMAGE_FIELDS)
#: Labels of shared widgets that say something else in mode text-to-image (its help text comes from its config).
TEXT_TO_IMAGE_LABELS = {"max_train_steps": "Diffusion steps (after the autoencoder's)",
                        "sample_every": "Validation grid every N steps",
                        "sample_inference_steps": "Sampling steps (PNDM)"}
#: Accordion of the text-to-image mode's own settings (shown in that mode only), and the unconditional mode's.
TEXT_TO_IMAGE_SECTION, ARCHITECTURE_SECTION = "Text-to-image: guidance and autoencoder", "Architecture (advanced)"
#: Layout: (accordion title or "" for always visible, open?, fields).
SECTIONS = (
    ("", True, ("mode", "run_name", "preset", "init_from", "validation_prompts", "resolution", "train_batch_size",
                "vae_steps", "max_train_steps", "learning_rate")),
    ("Schedule and optimizer", False, ("num_epochs", "lr_scheduler", "lr_warmup_steps", "gradient_accumulation_steps",
                                       "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                                       "max_grad_norm", "mixed_precision")),
    ("Diffusion", False, ("num_train_timesteps", "beta_schedule", "prediction_type", "snr_gamma", "noise_offset",
                          "random_flip", "center_crop")),
    ("EMA", False, ("use_ema", "ema_max_decay", "ema_power", "ema_inv_gamma", "ema_update_after_step")),
    ("Samples and checkpoints", False, ("seed", "sample_every", "num_samples", "sample_inference_steps",
                                        "save_every", "checkpoints_total_limit")),
    (ARCHITECTURE_SECTION, False, ("block_out_channels", "layers_per_block", "attention_levels",
                                   "attention_head_dim")),
    (TEXT_TO_IMAGE_SECTION, False, ("caption_dropout", "guidance_scale", "images_per_prompt", "vae_learning_rate")),
)
ATTENTION_HELP = ("Levels whose down and up blocks use self-attention (AttnDownBlock2D / AttnUpBlock2D), "
                  "comma-separated; empty = none.")
#: Fields of the architecture that the preset dropdown fills in.
ARCHITECTURE = ("block_out_channels", "layers_per_block", "attention_levels", "attention_head_dim")
#: Widgets the preset dropdown fills in: the architecture, its resolution, its training settings.
PRESET_FILLED = (*ARCHITECTURE, "resolution", *PRESET_TRAINING_FIELDS)


def default_values() -> dict[str, Any]:
    """The widget values of a fresh tab (TrainConfig's defaults, architecture as text)."""
    cfg = TrainConfig()
    values = {name: getattr(cfg, name) for name in INPUT_NAMES
              if name not in ARCHITECTURE and name not in TEXT_TO_IMAGE_FIELDS and name != "mode"}
    values.update(preset_values(cfg.preset))
    t2i = TextToImageConfig()
    values.update({name: getattr(t2i, name) for name in TEXT_TO_IMAGE_FIELDS}, mode=TRAIN_MODES[0])
    values["validation_prompts"] = "\n".join(t2i.validation_prompts)
    return values


def mode_defaults(mode: str, preset: str | None = None) -> dict[str, Any]:
    """The values of the shared widgets a fresh tab shows in ``mode`` (unconditional: with ``preset``'s
    training settings, the tab's default preset when None)."""
    if mode == TEXT_TO_IMAGE:
        t2i = TextToImageConfig()
        return {name: getattr(t2i, name) for name in SHARED_FIELDS}
    values = default_values()
    if preset:
        values.update(preset_values(preset))
    return {name: values[name] for name in SHARED_FIELDS}


def mode_changes(mode: str, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What switching the Mode dropdown to ``mode`` does to each settings widget, as ``gr.update`` keywords.

    The other mode's own widgets hide and this mode's show. A shared widget gets this mode's
    label and help, and this mode's default value where it still holds the other mode's default
    (a value the person typed stays, e.g. a learning rate they chose). ``values`` are the
    widgets' current values by name.
    """
    t2i = mode == TEXT_TO_IMAGE
    before = mode_defaults(TRAIN_MODES[0] if t2i else TEXT_TO_IMAGE, values.get("preset"))
    after = mode_defaults(mode, values.get("preset"))
    owner = TextToImageConfig if t2i else TrainConfig
    changes: dict[str, dict[str, Any]] = {name: {"visible": not t2i} for name in UNCONDITIONAL_FIELDS}
    changes.update({name: {"visible": t2i} for name in TEXT_TO_IMAGE_FIELDS})
    for name in SHARED_FIELDS:
        change = {"label": (TEXT_TO_IMAGE_LABELS.get(name) if t2i else None) or _label(name),
                  "info": owner.help_for(name)}
        if name in values and same_value(values[name], before[name]) and not same_value(before[name], after[name]):
            change["value"] = after[name]
        changes[name] = change
    # what the UNet predicts: text-to-image trains epsilon or v_prediction, not the DDPM's 'sample'
    changes["prediction_type"]["choices"] = list(TEXT_TO_IMAGE_PREDICTIONS if t2i else PREDICTION_TYPES)
    return changes


def preset_values(preset: str) -> dict[str, Any]:
    """The widget values ``preset`` fills in: architecture, resolution and its training settings
    (nothing changes for 'custom')."""
    p = PRESETS.get(preset)
    if p is None:
        return {}
    return {"block_out_channels": ", ".join(str(c) for c in p.block_out_channels),
            "layers_per_block": p.layers_per_block,
            "attention_levels": ", ".join(str(i + 1) for i in p.attention_levels),
            "attention_head_dim": p.attention_head_dim,
            "resolution": p.resolution,
            **p.training_defaults}


def _ints(text: Any, label: str) -> tuple[int, ...]:
    if isinstance(text, (list, tuple)):
        parts = [str(t) for t in text]
    else:
        parts = [part for part in str(text or "").replace(";", ",").split(",")]
    out = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ConfigError(f"{label} must be whole numbers separated by commas (got {part!r}).") from None
    return tuple(out)


def build_config(values: dict[str, Any], ctx: StudioContext | None = None, **overrides: Any) -> TrainConfig:
    """Turn named widget values into a validated ``TrainConfig``.

    Args:
        values: Widget values by field name (``INPUT_NAMES``); missing ones keep defaults.
        ctx: The app context: supplies the dataset, workspace and device.
        **overrides: Fields set last (``resume``, ...).

    Raises:
        ConfigError: with the widget's label in the message.
    """
    hints = {**typing.get_type_hints(TextToImageConfig), **typing.get_type_hints(TrainConfig)}
    data = parse_values(values, FIELDS, hints, "training", _ints)
    mode = data.pop("mode", None) or TRAIN_MODES[0]
    t2i = {name: data.pop(name) for name in TEXT_TO_IMAGE_FIELDS if name in data}
    if mode == TEXT_TO_IMAGE:
        return text_to_image_config(data, t2i, ctx, **overrides)
    levels = data.pop("attention_levels", None)
    if "block_out_channels" in data:
        channels = data["block_out_channels"]
        attention = tuple(i - 1 for i in (levels or ()))
        bad = [i + 1 for i in attention if not 0 <= i < len(channels)]
        if bad:
            raise ConfigError(f"Attention level {bad[0]} does not exist: the UNet has {len(channels)} levels "
                              f"(1 = highest resolution).")
        data["down_block_types"], data["up_block_types"] = block_types(len(channels), attention)
        data["preset"] = CUSTOM if channels else data.get("preset", CUSTOM)
    if ctx is not None:
        data.update(data=ctx.dataset.get().config, workspace=str(ctx.workspace), device=ctx.settings.device)
    data.update(overrides)
    return TrainConfig(**data)


def text_to_image_config(data: dict[str, Any], t2i: dict[str, Any], ctx: StudioContext | None = None,
                         **overrides: Any) -> TextToImageConfig:
    """The text-to-image mode's config: the shared widgets, its own widgets, the model sizes' defaults."""
    values = {name: data[name] for name in SHARED_FIELDS if name in data}
    if values.get("prediction_type") == "sample":
        raise ConfigError("Text-to-image trains with epsilon or v_prediction; pick one of them as prediction_type.")
    values.update(t2i)
    if ctx is not None:
        values.update(data=ctx.dataset.get().config, workspace=str(ctx.workspace), device=ctx.settings.device)
    values.update(overrides)
    return TextToImageConfig(**values)


def _label(name: str) -> str:
    return field_label(FIELDS, name)


def architecture_preset(values: dict[str, Any]) -> str:
    """The preset whose architecture the architecture widgets hold, or 'custom'."""
    try:
        channels = _ints(values.get("block_out_channels"), "block_out_channels")
        levels = tuple(i - 1 for i in _ints(values.get("attention_levels"), "attention levels"))
        down, up = block_types(len(channels), levels)
        head = values.get("attention_head_dim")
        return preset_matching(channels, int(values.get("layers_per_block") or 0), down, up,
                               int(head) if head not in (None, "") else None)
    except (StudioError, TypeError, ValueError):
        return CUSTOM


def model_summary(values: dict[str, Any]) -> str:
    """Markdown: the preset the architecture matches, parameter count and a memory estimate."""
    try:
        cfg = build_config(values)
    except StudioError as exc:
        return f"⚠️ {exc.user_message}"
    from studio.budget import text_to_image_plan, train_plan

    if isinstance(cfg, TextToImageConfig):
        from studio import small_sd

        counts = small_sd.parameter_counts(small_sd.SmallSDSpec.of(cfg))
        sizes = " · ".join(f"{name} {human_count(n)}" for name, n in counts.items())
        return (f"**Text-to-image from scratch** · **{human_count(sum(counts.values()))} parameters** ({sizes}; at "
                f"most, the vocabulary learnt from few captions is smaller)\n\n"
                f"A small Stable Diffusion (CLIP tokenizer learnt from the captions, "
                f"CLIP text encoder, AutoencoderKL, UNet2DConditionModel). Steps 1–{cfg.vae_steps} train the "
                f"autoencoder (loss: reconstruction; grids: images over their reconstructions), steps "
                f"{cfg.vae_steps + 1}–{cfg.total_steps} the UNet and text encoder (loss: diffusion; grids: one row "
                f"of {cfg.images_per_prompt} images per prompt: {'; '.join(cfg.validation_prompts)}). "
                f"Open the finished run in **Generate** to prompt it.\n\n" + text_to_image_plan(cfg).markdown())

    params = parameter_count(cfg.block_out_channels, cfg.layers_per_block, cfg.down_block_types, cfg.up_block_types)
    attention = ", ".join(str(i + 1) for i in attention_levels_of(cfg.down_block_types)) or "none"
    text = (f"**{cfg.preset}** · **{human_count(params)} parameters** · attention at level(s) {attention}\n\n"
            + train_plan(cfg).markdown())
    if cfg.init_from:
        text += (f"\n\nStarting from **{cfg.init_from}**: its architecture and noise schedule "
                 f"({schedule_text(cfg.noise_schedule())}) replace this run's settings.")
    return text + "".join(f"\n\n⚠️ {w}" for w in cfg.run_length_warnings())
