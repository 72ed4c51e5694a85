"""What a finished training run leaves behind as a model, and where it goes.

Responsible for: the DDPM's ``model/`` folder (a ``DDPMPipeline`` with the EMA weights plus a
model card); a fine-tune's ``lora/`` folder (diffusers ``pytorch_lora_weights.safetensors``
plus a kohya/A1111 file) or ``model/`` folder (a diffusers pipeline, optionally a single-file
checkpoint), the model card ``README.md`` written beside either, and the optional push to the
Hugging Face Hub.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from studio.config.finetune import FinetuneConfig
from studio.config.train import TrainConfig
from studio.errors import StudioError, describe_exception
from studio.runs import RunDir


# ----------------------------------------------------------------------------- model/
def export_ddpm_pipeline(unet: torch.nn.Module, ema: Any, noise_scheduler: Any, run: RunDir, cfg: TrainConfig,
                    step: int, total: int, world: int) -> Path:
    """Write ``model/``: a DDPMPipeline with the EMA weights (safetensors) and a model card."""
    import shutil

    from diffusers import DDPMPipeline, UNet2DModel

    export = UNet2DModel.from_config(unet.config)
    export.load_state_dict(unet.state_dict())
    if ema is not None:
        ema.copy_to(export.parameters())
    pipe = DDPMPipeline(unet=export, scheduler=noise_scheduler)
    tmp = run.root / ".model-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    from studio.model_cards import ddpm_card, scrub_local_paths

    scrub_local_paths(tmp)
    (tmp / "README.md").write_text(ddpm_card(run, cfg, step, total, world, sum(p.numel() for p in export.parameters()),
                                             ema is not None), encoding="utf-8")
    old = run.root / ".model-old"
    shutil.rmtree(old, ignore_errors=True)
    if run.model_dir.exists():
        os.replace(run.model_dir, old)
    os.replace(tmp, run.model_dir)
    shutil.rmtree(old, ignore_errors=True)
    return run.model_dir



def export_lora(run: RunDir, cfg: FinetuneConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
                sdxl: bool = False) -> Path:
    """Write the trained adapters to ``run.lora_dir`` (diffusers and kohya formats); returns the folder.

    Args:
        run: The run folder.
        cfg: The fine-tune settings (base model and trigger words go into the metadata).
        unet: The unwrapped UNet carrying LoRA adapters.
        text_encoder: The unwrapped text encoder when its adapters trained, else None.
        sdxl: Whether the base is SDXL.
    """
    from studio.lora_export import save_lora

    out = run.lora_dir
    from studio.model_cards import public_name

    save_lora(out, unet, text_encoder, kohya_name=f"{run.name}-kohya.safetensors",
              metadata={"base_model": public_name(cfg.pretrained_model_name_or_path),
                        "trigger_words": cfg.trigger_words}, sdxl=sdxl)
    return out


def export_sd_pipeline(run: RunDir, cfg: FinetuneConfig, pipe: Any, step: int, report: Callable[..., None]) -> Path:
    """Write ``pipe`` to ``run.model_dir`` as a diffusers folder (and a single file when asked); returns it."""
    from studio.model_cards import scrub_local_paths

    out = run.model_dir
    pipe.save_pretrained(out, safe_serialization=True)
    scrub_local_paths(out)  # diffusers writes the base's local path as _name_or_path
    from studio.transformers_compat import portable_pipeline_folder

    portable_pipeline_folder(out, pipe)  # text encoder + tokenizer files transformers 4.x loads too
    if cfg.save_single_file:
        from studio.single_file import save_single_file

        try:
            path = save_single_file(pipe, out / f"{run.name}.safetensors")
            report("status", step=step, message=f"single-file checkpoint {path.name}")
        except StudioError as exc:  # the diffusers folder is written either way
            report("warning", step=step, message=f"No single-file checkpoint: {exc.user_message}")
    return out


def export_finetune(run: RunDir, cfg: FinetuneConfig, pipe: Any, text_encoder_trained: bool, step: int,
                    report: Callable[..., None], ema: Any = None) -> Path:
    """A finished fine-tune's output: ``lora/`` (LoRA methods) or ``model/`` (``pipe``, the trained
    pipeline, with the ``ema`` weights when given), a model card beside it, and the Hub push when
    ``cfg.push_to_hub``; returns the folder."""
    if ema is not None and not cfg.is_lora:  # a full fine-tune exports its EMA weights
        ema.copy_to(pipe.unet.parameters())
    sdxl = type(pipe).__name__.startswith("StableDiffusionXL")
    if cfg.is_lora:
        out = export_lora(run, cfg, pipe.unet, pipe.text_encoder if text_encoder_trained else None, sdxl=sdxl)
    else:
        out = export_sd_pipeline(run, cfg, pipe, step, report)
    write_model_card(out, cfg, run, step, sdxl=sdxl)
    if cfg.push_to_hub:
        message = push_to_hub(out, cfg.hub_model_id)
        report("warning" if message.startswith("Not pushed") else "status", step=step, message=message)
    return out


def write_model_card(folder: Path, cfg: FinetuneConfig, run: RunDir, step: int, sdxl: bool = False) -> Path:
    """README.md with the base model, trigger words, settings and the validation images."""
    samples = sorted(run.samples_dir.glob("step-*.png"))
    shown = [samples[0], samples[-1]] if len(samples) > 1 else samples
    (folder / "samples").mkdir(exist_ok=True)
    lines = []
    for path in shown:
        shutil.copy2(path, folder / "samples" / path.name)
        label = "base model (step 0)" if path.name == "step-000000.png" else f"after {path.stem.split('-')[1].lstrip('0') or '0'} steps"
        lines.append(f"![{label}](samples/{path.name})  \n*{label}*")
    from studio.model_cards import finetune_card

    text = finetune_card(folder, cfg, run, step, lines, sdxl=sdxl)
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def _hub_unreachable(api: Any, repo_id: str) -> str:
    """Why the Hub cannot take an upload now ("no answer within 5 s"...), or "" when it answered."""
    from huggingface_hub.errors import HfHubHTTPError

    from studio.hub import LOOKUP_TIMEOUT_S, unreachable_reason

    try:
        api.repo_info(repo_id, timeout=LOOKUP_TIMEOUT_S)
    except HfHubHTTPError:  # it answered (a repo not there yet is created next)
        return ""
    except Exception as exc:  # noqa: BLE001 - any transport failure
        return f"the Hugging Face Hub could not be reached: {unreachable_reason(exc, LOOKUP_TIMEOUT_S)}"
    return ""


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload ``folder`` to the Hub repository ``repo_id``; returns what happened in words.

    Never raises for a missing network or token: the result is on disk either way.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return ("Not pushed to the Hub: the studio is offline (HF_HUB_OFFLINE). "
                f"The result is in {folder}; upload it later with `hf upload {repo_id} {folder}`.")
    try:
        from huggingface_hub import HfApi, get_token

        if not get_token():
            return ("Not pushed to the Hub: no token. Log in with `hf auth login` (or set HF_TOKEN) and "
                    f"upload with `hf upload {repo_id} {folder}`.")
        api = HfApi()
        reason = _hub_unreachable(api, repo_id)  # create/upload have no timeout: a stalled Hub would hang here
        if reason:
            return (f"Not pushed to the Hub ({reason}). The result is in {folder}; upload it later with "
                    f"`hf upload {repo_id} {folder}`.")
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder))
    except Exception as exc:  # network, permissions: the files are safe on disk
        return f"Not pushed to the Hub ({describe_exception(exc)}). The result is in {folder}."
    return f"Pushed to https://huggingface.co/{repo_id}"
