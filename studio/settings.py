"""Launch settings: where the studio listens, who may log in, what it may serve.

Parsed from the command line by ``launch.py`` and checked here so the rules of the
house hold wherever the app is built: loopback by default, and any public exposure
(``--share`` or a non-loopback host) is password protected, with a random password
generated and printed when none was given.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_MAX_FILE_SIZE = "1gb"


@dataclass
class LaunchSettings:
    """Everything ``launch.py`` decides before building the app.

    Attributes:
        host: Interface to bind; 127.0.0.1 keeps the studio private to this machine.
        port: TCP port; 0 lets the OS pick a free one (tests).
        share: Ask Gradio for a public share link (needs auth).
        auth: (user, password) pairs; empty means no login.
        workspace: Folder for runs, generated images and caches; the only user folder served.
        device: auto, cpu, cuda or mps.
        offline: Never contact the Hugging Face Hub.
        max_file_size: Upload limit in Gradio's notation ("1gb", "500mb").
        queue_size: Most requests waiting in the queue before new ones are refused.
        generated_password: True when the password was made up at launch (to print it).
    """

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: list[tuple[str, str]] = field(default_factory=list)
    workspace: Path = Path("runs")
    device: str = "auto"
    offline: bool = False
    max_file_size: str = DEFAULT_MAX_FILE_SIZE
    queue_size: int = 64
    generated_password: bool = False

    def __post_init__(self) -> None:
        self.workspace = check_workspace(self.workspace)
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)} (got {self.device!r}).")
        if not (0 <= int(self.port) <= 65535):
            raise ConfigError(f"--port must be between 0 and 65535 (got {self.port}).")
        if self.queue_size < 1:
            raise ConfigError("--queue-size must be at least 1.")
        for user, password in self.auth:
            if not user or not password:
                raise ConfigError("Each login needs a user name and a password (user:password).")

    @property
    def is_public(self) -> bool:
        """True when people other than this machine's user can reach the app."""
        return self.share or not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(value: str) -> tuple[str, str]:
    """Parse 'user:password' (the password may itself contain ':')."""
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"Auth must look like user:password (got {value!r}).")
    return user, password


def check_workspace(path: str | Path) -> Path:
    """The workspace folder, resolved and created; a ``ConfigError`` when it cannot be used.

    Refuses a path that is a file, a folder that cannot be created, and one this user may
    not write to, each with one line saying so (never a traceback at launch or in the CLI).
    """
    try:
        folder = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"Workspace {path} cannot be used: {exc}.") from None
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"Workspace {folder} is a file, not a folder.",
                          "Choose another --workspace (or move the file aside).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Workspace {folder} cannot be created: {exc.strerror or exc}.",
                          "Choose a folder you may write to with --workspace.") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"Workspace {folder} is not writable by this user.",
                          "Choose a folder you may write to with --workspace.")
    return folder


def read_auth_file(path: str | Path) -> list[tuple[str, str]]:
    """Read one 'user:password' per line (UTF-8, a BOM allowed); blank lines and '#' comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--auth-file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--auth-file {path} is not UTF-8 text (byte {exc.start}).",
                          "Save it as UTF-8 with one user:password per line.") from None
    except OSError as exc:
        raise ConfigError(f"--auth-file {path} cannot be read: {exc.strerror or exc}.") from None
    pairs = [parse_auth(line.strip()) for line in text.splitlines()
             if line.strip() and not line.strip().startswith("#")]
    if not pairs:
        raise ConfigError(f"--auth-file {path} holds no user:password line.")
    return pairs


def secure(settings: LaunchSettings) -> LaunchSettings:
    """Enforce 'never public without a login': add a random password when needed.

    Args:
        settings: Parsed settings.

    Returns:
        The same settings, with ``auth`` filled in (user 'studio', a random
        password) and ``generated_password`` set when the app is public and had no login.
    """
    if settings.is_public and not settings.auth:
        settings.auth = [("studio", secrets.token_urlsafe(12))]
        settings.generated_password = True
    return settings


def running_on_colab() -> bool:
    """True inside Google Colab (where a share link is the only way to open the UI)."""
    return "COLAB_RELEASE_TAG" in os.environ or "COLAB_GPU" in os.environ
