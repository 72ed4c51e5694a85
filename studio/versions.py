"""The software stack the studio runs on, and the one table of releases it is tested with.

``python launch.py --version`` (and ``--check``) print the installed versions of
Python, torch, diffusers, transformers and gradio, the device found, and whether
each is a release series the test suite runs against, so a bug report carries it.
The README's "Tested with" table states the same rows (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import os
import platform
from dataclasses import dataclass
from importlib import metadata

#: package -> release series (major.minor) the test suite runs on; CI is a 2-core
#: CPU machine with the CPU build of torch (requirements-cpu.txt pins it).
TESTED: dict[str, str] = {
    "python": "3.11",
    "torch": "2.13",
    "diffusers": "0.42",
    "transformers": "5.24",
    "gradio": "6.31",
}


@dataclass(frozen=True)
class StackRow:
    """One row of the report: a package, what is installed, what we test."""

    name: str
    installed: str | None
    tested: str

    @property
    def is_tested(self) -> bool:
        return self.installed is not None and release_series(self.installed) == self.tested


def release_series(version: str) -> str:
    """'2.13.0+cu128' -> '2.13' (local build labels and patch releases don't matter)."""
    from packaging.version import InvalidVersion, Version

    try:
        return ".".join(str(n) for n in Version(version).release[:2])
    except InvalidVersion:
        return version


def installed_versions() -> dict[str, str | None]:
    """The installed version of Python and of each package in ``TESTED`` (None: missing)."""
    found: dict[str, str | None] = {}
    for name in TESTED:
        if name == "python":
            found[name] = platform.python_version()
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def stack_rows(installed: dict[str, str | None] | None = None) -> list[StackRow]:
    """The report's rows for ``installed`` (default: this environment)."""
    installed = installed_versions() if installed is None else installed
    return [StackRow(name, installed.get(name), tested) for name, tested in TESTED.items()]


def describe_device(preference: str = "auto") -> str:
    """The device ``auto`` picks, with the facts a bug report needs (GPU name, memory)."""
    try:
        import torch

        from studio.devices import resolve_device

        device = resolve_device(preference)
    except Exception as exc:  # a broken torch is itself the answer
        return f"unknown ({type(exc).__name__}: {exc})"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        cuda = torch.version.cuda or "?"
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {cuda})"
    if device == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({os.cpu_count()} cores, no GPU found by torch)"


def format_report(rows: list[StackRow], device: str) -> str:
    """The plain-text table ``--version``/``--check`` print."""
    from studio import __version__

    lines = [f"Diffusion Studio {__version__}", f"{'package':<13} {'installed':<22} tested"]
    for row in rows:
        mark = "yes" if row.is_tested else f"no (we test {row.tested}.x)"
        lines.append(f"{row.name:<13} {row.installed or 'MISSING':<22} {mark}")
    lines.append(f"{'device':<13} {device}")
    untested = [row.name for row in rows if not row.is_tested]
    if not untested:
        lines.append("This stack is one the studio is tested with.")
    else:
        lines.append(f"Not the tested stack ({', '.join(untested)} differ): it may work; "
                     "mention this table in a bug report.")
    return "\n".join(lines)


class _StackReportAction(argparse.Action):
    """Like argparse's ``version`` action: print the report, then exit."""

    def __init__(self, option_strings, dest, strict: bool = False, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.strict = strict

    def __call__(self, parser, namespace, values, option_string=None):
        rows = stack_rows()
        print(format_report(rows, describe_device()), flush=True)
        untested = any(not row.is_tested for row in rows)
        parser.exit(1 if self.strict and untested else 0)


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--version`` (report, exit 0) and ``--check`` (report, exit 1 off the tested stack)."""
    parser.add_argument("--version", action=_StackReportAction,
                        help="print the versions of Python, torch, diffusers, transformers, gradio "
                             "and the device, then exit")
    parser.add_argument("--check", action=_StackReportAction, strict=True,
                        help="like --version; exit status 1 when the stack is not the tested one")
