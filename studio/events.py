"""Events a job reports while it runs, and their JSON form in ``events.jsonl``.

Trainers report through a callback taking ``Event`` objects and know nothing of who
watches: the job manager turns them into a ``Snapshot`` for the UI, the CLI into a
progress bar, and the run folder keeps them as one JSON line each.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

#: Every kind of event, in roughly the order a run emits them.
EVENT_KINDS = (
    "status",      # a phase begins: "loading data", "caching latents", ...
    "step",        # an optimisation step: loss, smoothed_loss, lr, images_per_s, eta_s
    "samples",     # a sample/validation grid was written to ``path``
    "quality",     # the grid's quality figure (``quality``, lower is better) and its reference levels
    "checkpoint",  # a checkpoint was saved to ``path``
    "warning",     # something a person should know (fell back to an older checkpoint, ...)
    "finished",    # the run completed; ``path`` is the exported model
    "stopped",     # stopped on request; ``path`` is the checkpoint to resume from
    "failed",      # ended by an error; ``message`` says why
)
FINAL_KINDS = ("finished", "stopped", "failed")


@dataclass
class Event:
    """One thing that happened in a job.

    Attributes:
        kind: One of ``EVENT_KINDS``.
        step: Optimisation step the event belongs to (0 before training starts).
        total: Planned number of steps (0 when unknown).
        loss: Raw loss of this step (``step`` events).
        smoothed_loss: Exponential moving average of the loss.
        lr: Learning rate used for this step.
        images_per_s: Training throughput over the last interval.
        eta_s: Estimated seconds to the end.
        path: File or folder the event produced (samples, checkpoint, model).
        quality: Sample-quality figure of the grid at ``step`` (``quality`` events; see
            ``studio.quality``: sliced Wasserstein distance x 1000, lower is better).
        noise_level: The figure of pure noise images (an untrained model), same measure.
        data_level: The figure of held-out dataset images (a perfect model), same measure.
        message: Human text (status, warnings, errors).
        time: Wall-clock time (seconds since the epoch).
    """

    kind: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    smoothed_loss: float | None = None
    lr: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    path: str | None = None
    quality: float | None = None
    noise_level: float | None = None
    data_level: float | None = None
    message: str = ""
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict without the empty fields."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Event":
        """Inverse of ``to_dict`` (unknown keys are ignored for forward compatibility)."""
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


#: The callback type trainers receive.
EventSink = Callable[[Event], None]


def ignore_events(event: Event) -> None:
    """An ``EventSink`` that drops everything (tests, one-off calls)."""
