"""A Hub dataset id when the Hub is offline or unreachable: one clear message within 3 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from studio.config.data import DataConfig
from studio.data import load_image_dataset
from studio.errors import DataError

#: Run in a fresh process: HF_ENDPOINT is read when huggingface_hub is imported. The libraries
#: are imported before the clock starts, as the running app already has them.
UNREACHABLE = """
import json, time
import datasets, huggingface_hub
from huggingface_hub import HfApi  # noqa: F401
from studio.config.data import DataConfig
from studio.data import load_image_dataset
from studio.errors import DataError
start = time.monotonic()
try:
    load_image_dataset(DataConfig(source="hub", hub_id="someone/flowers"))
    message = "loaded?!"
except DataError as exc:
    message = exc.user_message
print(json.dumps({"seconds": time.monotonic() - start, "message": message}))
"""


def test_an_unreachable_hub_is_one_clear_message_within_3_s(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                              "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf"),  # a closed port
               PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", UNREACHABLE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["seconds"] < 3.0, result  # datasets' own retries took ~30 s
    assert result["message"].startswith("Could not reach the Hugging Face Hub") and "\n" not in result["message"]
    assert "someone/flowers" in result["message"] and "not in the local cache" in result["message"]
    assert "Retrying" not in done.stderr


def test_offline_and_not_cached_is_one_clear_message_at_once():
    import huggingface_hub  # noqa: F401  (loaded in the app already)

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    start = time.monotonic()
    with pytest.raises(DataError, match="not in the local cache and the studio is offline") as info:
        load_image_dataset(DataConfig(source="hub", hub_id="someone/flowers"))
    assert time.monotonic() - start < 3.0 and "\n" not in info.value.user_message

