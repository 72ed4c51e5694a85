"""The app-level objects every tab shares, passed explicitly (never a module global).

``StudioContext`` is built once per app by ``tabs.build_app``: the launch settings,
the ``JobManager`` that owns training threads, the dataset selection handed from
the Dataset tab to the Train and Fine-tune tabs, and the pipeline manager of the
Generate tab (created lazily, on first use, because it imports torch), and the
``EngineLoader`` that imports torch and diffusers in the background at launch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.config.data import EMOJI_CATEGORIES, DataConfig, dataset_summary
from studio.engine import EngineLoader
from studio.jobs import JobManager
from studio.settings import LaunchSettings


@dataclass
class DatasetChoice:
    """The dataset the training tabs will use: its source and a one-line summary."""

    config: DataConfig
    summary: str
    count: int = 0
    has_captions: bool = False

    @property
    def unsaid_count(self) -> int:
        """The image count when the summary does not already say it (a load's summary does), else 0."""
        return self.count if self.count and f"{self.count} images" not in self.summary else 0


class DatasetSelection:
    """The Dataset tab's hand-off to Train and Fine-tune (thread-safe).

    Starts as the bundled emoji set's smileys (``STARTING_CATEGORY``), so training works with no
    dataset step at all and shows faces within minutes on a CPU (the whole set takes hours).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        start = DataConfig.starting()
        count = EMOJI_CATEGORIES[start.category]
        # the summary a load of it gives (ImageDataset.summary), without reading the set at import
        self._choice = DatasetChoice(start, dataset_summary(count, start.label, True, 0), count, True)
        self.version = 0

    def set(self, choice: DatasetChoice) -> None:
        """Make ``choice`` the dataset the training tabs use."""
        with self._lock:
            self._choice = choice
            self.version += 1

    def get(self) -> DatasetChoice:
        """The current choice."""
        with self._lock:
            return self._choice


@dataclass
class StudioContext:
    """Shared state of one running studio."""

    settings: LaunchSettings
    jobs: JobManager = field(default_factory=JobManager)
    dataset: DatasetSelection = field(default_factory=DatasetSelection)
    engine: EngineLoader = field(default_factory=EngineLoader)
    _services: dict[str, Any] = field(default_factory=dict)
    _services_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def workspace(self) -> Path:
        return self.settings.workspace

    @property
    def pipelines(self) -> Any:
        """The Generate tab's ``studio.models.PipelineManager`` (created on first use, once the engine is loaded)."""
        self.engine.wait()
        with self._services_lock:
            if "pipelines" not in self._services:
                from studio.models import PipelineManager

                self._services["pipelines"] = PipelineManager(
                    device=self.settings.device, workspace=self.settings.workspace,
                    offline=self.settings.offline)
            return self._services["pipelines"]
