"""``python -m studio train|... --config run.json``: see ``studio.cli``."""

from studio.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
