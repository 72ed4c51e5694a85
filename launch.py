"""Start Diffusion Studio: ``python launch.py [--host H] [--port P] [--share] ...``.

Parses the command line into ``LaunchSettings``, enforces the safety rules (a
public app always has a login), builds the app with ``tabs.build_app`` and
launches it. Nothing else happens at import time.

Exit codes: 0 after a normal shutdown; 2 for anything you can fix (a bad flag, an
unreadable ``--auth-file``, a workspace that is a file or cannot be written, a port
in use), always as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import os
import sys

from studio.errors import StudioError, storage_error
from studio.settings import (DEFAULT_MAX_FILE_SIZE, DEVICES, LaunchSettings, parse_auth, read_auth_file,
                             running_on_colab, secure)
from studio.versions import add_report_flags


def parse_args(argv: list[str] | None = None) -> LaunchSettings:
    """Turn command-line flags into checked, secured ``LaunchSettings``."""
    colab = running_on_colab()
    p = argparse.ArgumentParser(description="Diffusion Studio: datasets, training, fine-tuning and generation.",
                                epilog="exit codes: 0 normal shutdown; 2 something you can fix (bad flag, auth "
                                       "file, workspace, port), printed as one 'error:' line.")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action=argparse.BooleanOptionalAction, default=colab,
                   help="create a public share link (always password protected; default on Colab)")
    p.add_argument("--auth", default="", help="login as user:password")
    p.add_argument("--auth-file", default="", help="file with one user:password per line")
    p.add_argument("--workspace", default="runs", help="folder for runs, images and caches (default ./runs)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub")
    p.add_argument("--max-file-size", default=DEFAULT_MAX_FILE_SIZE, help="upload limit, e.g. 1gb or 500mb")
    p.add_argument("--queue-size", type=int, default=64, help="most requests waiting in the queue")
    add_report_flags(p)  # --version / --check: the installed stack and device, then exit
    args = p.parse_args(argv)

    auth = []
    if args.auth:
        auth.append(parse_auth(args.auth))
    if args.auth_file:
        auth.extend(read_auth_file(args.auth_file))
    settings = LaunchSettings(host=args.host, port=args.port, share=args.share, auth=auth,
                              workspace=args.workspace, device=args.device, offline=args.offline,
                              max_file_size=args.max_file_size, queue_size=args.queue_size)
    return secure(settings)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_args(argv)
    except StudioError as exc:
        print(f"error: {exc.user_message}", file=sys.stderr)
        return 2
    if settings.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from tabs import build_app, launch_kwargs

    if settings.generated_password:
        user, password = settings.auth[0]
        bar = "=" * 64
        print(f"\n{bar}\n  This studio is reachable from other machines, so it needs a login.\n"
              f"  user: {user}\n  password: {password}\n"
              f"  (choose your own with --auth user:password)\n{bar}\n", flush=True)
    print(f"Workspace: {settings.workspace}", flush=True)
    try:
        app = build_app(settings)
    except StudioError as exc:
        print(f"error: {exc.user_message}", file=sys.stderr)
        return 2
    try:
        app.launch(**launch_kwargs(settings), prevent_thread_lock=True)
    except OSError as exc:  # the port is taken, the disk is full...: one line, not a traceback
        problem = storage_error(exc)
        print(f"error: {problem.user_message if problem else exc}", file=sys.stderr)
        app.studio_context.jobs.stop_all()
        return 2
    try:
        app.studio_context.engine.start()  # the page is served: torch and diffusers now load behind it
        app.block_thread()
    finally:
        app.studio_context.jobs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
