"""Headless entry: ``python -m studio <command> --config run.json``, the same engine as the UI.

Each command is one row of ``COMMANDS``: the import path of its config dataclass and
of its runner, a function ``runner(cfg, events, stop)`` like the trainers. Adding a
command is one line. The config file is the ``config.json`` a run folder holds (or
one written by hand / by the UI's "CLI command" box); ``--resume``, ``--workspace``
and ``--device`` override its fields of the same name.

Under ``torchrun`` / ``accelerate launch`` every process runs this; only the main
process (rank 0) shows progress and writes the run folder. Ctrl-C (or SIGTERM) asks
the job to stop after the current step and save a resumable checkpoint (before the first
step: within the current image, batch or denoising step, saving nothing); a second
Ctrl-C aborts at once.

Exit codes (also in ``--help`` and the README):

    0   finished, or stopped (Ctrl-C) with a resumable checkpoint
    1   an unexpected error (a bug: the traceback is printed)
    2   something you can fix: bad command line or config, unreadable data or model,
        no usable checkpoint, the device or run folder busy with another job, the disk
        full or a folder not writable, out of memory (one line on stderr says which)
    130 aborted by a second Ctrl-C
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from typing import Any, Callable

from studio.errors import ConfigError, StudioError, describe_exception, memory_error, storage_error

#: command -> (config class "module:Class", runner "module:function").
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("studio.config.train:TrainConfig", "studio.trainers.ddpm:train"),
    "finetune": ("studio.config.finetune:FinetuneConfig", "studio.trainers.text_to_image:train"),
    "generate": ("studio.config.generate:GenerateConfig", "studio.generate:run_cli"),
}

#: (command, config "mode") -> (config class, runner) of a command's other modes: a train config
#: with ``"mode": "text-to-image"`` trains a small Stable Diffusion from scratch. No mode, or
#: "unconditional", is the command's row in ``COMMANDS``.
MODES: dict[tuple[str, str], tuple[str, str]] = {
    ("train", "text-to-image"): ("studio.config.text_to_image:TextToImageConfig",
                                 "studio.trainers.text_to_image_scratch:train"),
}

#: The exit codes, as ``--help`` prints them.
EXIT_CODES = """exit codes:
  0    finished, or stopped (Ctrl-C) with a resumable checkpoint
  1    an unexpected error (a bug: the traceback is printed)
  2    something you can fix: bad config, unreadable data or model, no usable
       checkpoint, device or run folder busy, disk full or folder not writable,
       out of memory
  130  aborted by a second Ctrl-C"""

#: Command-line flags that override config fields of the same name.
OVERRIDES = (
    ("--resume", "resume", "Continue a run: 'latest' = the newest intact checkpoint of the run named by the "
                           "config's run_name (a run's config.json names its run), or with no run_name of the "
                           "newest run that has a checkpoint; or a checkpoint folder."),
    ("--workspace", "workspace", "Folder holding the run folders."),
    ("--device", "device", "auto, cpu, cuda or mps."),
)


def entry(command: str, data: dict[str, Any]) -> tuple[str, str]:
    """The (config class, runner) import paths of ``command`` for the ``mode`` a config names.

    Raises:
        ConfigError: an unknown mode.
    """
    mode = data.get("mode", "unconditional") if isinstance(data, dict) else "unconditional"
    if mode in ("", "unconditional"):
        return COMMANDS[command]
    if (command, mode) not in MODES:
        known = ", ".join(["unconditional"] + [m for c, m in MODES if c == command])
        raise ConfigError(f"Unknown mode {mode!r} for '{command}': use one of {known}.")
    return MODES[(command, mode)]


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per row of ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog="python -m studio", description="Diffusion Studio, headless.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_path, _) in COMMANDS.items():
        p = sub.add_parser(name, help=f"run '{name}' from a JSON config ({config_path.split(':')[1]})",
                           epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", required=True, help="JSON file with the settings (e.g. a run's config.json).")
        for flag, _field, help_text in OVERRIDES:
            p.add_argument(flag, default=None, help=help_text)
        p.add_argument("--quiet", action="store_true", help="No progress bar, only the final line.")
    return parser


def load_config(command: str, path: str, overrides: dict[str, Any]) -> Any:
    """Read the config of ``command`` from ``path`` and apply the command-line overrides.

    A ``config.json`` written by a run carries ``"task"``; it must match the command.

    Raises:
        ConfigError: missing/malformed file, wrong task, unknown or invalid setting.
    """
    import dataclasses

    from studio.config.base import read_json_object

    data = read_json_object(path)
    task = data.pop("task", command)
    if task != command:
        raise ConfigError(f"{path} is a '{task}' config; run it with `python -m studio {task}`.")
    config_cls = _load(entry(command, data)[0])
    if data.get("mode") == "unconditional":
        data.pop("mode")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in fields:
            raise ConfigError(f"--{name} does not apply to '{command}'.")
        data[name] = value
    return config_cls.from_dict(data)


class ProgressPrinter:
    """An event sink drawing a tqdm bar, with one line per status, sample, checkpoint or warning."""

    def __init__(self, quiet: bool = False) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar = None
        self.quiet = quiet
        self.final = None

    def _write(self, text: str) -> None:
        if not self.quiet:
            (self.bar.write if self.bar is not None else self._tqdm.write)(text, file=sys.stderr)

    def __call__(self, event: Any) -> None:
        if event.kind == "step":
            if self.quiet:
                return
            if self.bar is None:
                self.bar = self._tqdm(total=event.total or None, initial=event.step - 1, unit="step",
                                      dynamic_ncols=True, file=sys.stderr)
            if event.total and self.bar.total != event.total:
                self.bar.total = event.total
            self.bar.update(event.step - self.bar.n)
            postfix = {"loss": f"{event.smoothed_loss:.4f}", "lr": f"{event.lr:.2e}"}
            if event.images_per_s:
                postfix["img/s"] = f"{event.images_per_s:.1f}"
            self.bar.set_postfix(postfix, refresh=event.step >= (event.total or event.step + 1))
            if event.total and event.step >= event.total:
                self.bar.close()
                self.bar = None
        elif event.kind in ("finished", "stopped", "failed"):
            self.final = event
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        elif event.kind == "warning":
            self._write(f"warning: {event.message}")
        elif event.kind in ("samples", "checkpoint"):
            self._write(f"{event.kind}: {event.path}")
        elif event.kind == "quality":
            self._write(event.message)
        elif event.kind == "status" and event.message != "training":
            self._write(event.message)


def _install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """Ctrl-C / SIGTERM set ``stop`` once; a second Ctrl-C raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):  # noqa: ARG001
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after this step, image or batch (a run that has trained saves a checkpoint); "
              "Ctrl-C again to abort", file=sys.stderr)

    for sig in previous:
        signal.signal(sig, handler)
    return lambda: [signal.signal(sig, h) for sig, h in previous.items()]


def _device_held(cfg: Any, command: str) -> Any:
    """The machine-wide device lock for this run (one per machine: local rank 0 only), or a no-op.

    So a CLI run and a studio app (or two CLI runs) never use one device at once.
    """
    import contextlib

    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return contextlib.nullcontext()
    from studio.locks import device_lock

    name = getattr(cfg, "run_name", "") or ""
    return device_lock(getattr(cfg, "device", "auto"), f"CLI {command}{f' {name!r}' if name else ''}")


def run_keeping_no_failed_start(runner: Callable, cfg: Any, events: Any, stop: threading.Event) -> Any:
    """``runner(cfg, events, stop)``; a new run folder it made and left untrained when it raised is removed.

    The same rule as the app's Start (``tabs.jobtab.start_job``): a start that fails
    before training (a base model that cannot load, bad data) leaves no run folder
    for Resume or Generate to offer. Resumed runs and runs with a step are kept.
    """
    workspace = getattr(cfg, "workspace", None)
    fresh = workspace is not None and not getattr(cfg, "resume", "")
    known = _folders(workspace) if fresh else set()
    try:
        return runner(cfg, events, stop)
    except BaseException:
        if fresh and int(os.environ.get("RANK", "0")) == 0:
            _discard_untrained(workspace, _folders(workspace) - known)
        raise


def _folders(workspace: str) -> set[str]:
    from pathlib import Path

    return {p.name for p in Path(workspace).iterdir()} if Path(workspace).is_dir() else set()


def _discard_untrained(workspace: str, names: set[str]) -> None:
    """Remove the run folders ``names`` of ``workspace`` that hold no trained state."""
    from pathlib import Path

    from studio.runs import RunDir, discard_if_never_trained

    for name in names:
        run = RunDir(Path(workspace) / name)
        if not run.config_path.is_file():
            continue
        try:
            with run.lock("clean-up"):  # never a folder another process is training in
                discard_if_never_trained(run)
        except StudioError:
            pass


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage
        return int(exc.code or 0)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = load_config(args.command, args.config,
                          {name: getattr(args, name) for _flag, name, _ in OVERRIDES})
    except StudioError as exc:
        print(f"error: {describe_exception(exc)}", file=sys.stderr)
        return 2
    runner = _load(entry(args.command, {"mode": getattr(cfg, "mode", "")})[1])
    stop = threading.Event()
    printer = ProgressPrinter(quiet=args.quiet or not is_main)
    restore = _install_stop_handlers(stop)
    try:
        with _device_held(cfg, args.command):
            result = run_keeping_no_failed_start(runner, cfg, printer, stop)
    except StudioError as exc:
        print(f"error: {describe_exception(exc)}", file=sys.stderr)
        return 2
    except (OSError, MemoryError, RuntimeError) as exc:  # a full disk, an unwritable folder, out of memory
        problem = storage_error(exc) if isinstance(exc, OSError) else memory_error(exc)
        if problem is None:
            raise
        print(f"error: {problem.user_message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    finally:
        restore()
    final = printer.final
    if is_main:
        if final is not None:
            print(f"{final.kind}: {final.message}")
        elif result is not None:
            print(f"done: {getattr(result, 'root', result)}")
    return 1 if final is not None and final.kind == "failed" else 0
