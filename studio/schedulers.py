"""The scheduler catalogue: one table from the names people know to diffusers classes.

``SCHEDULERS`` maps a display name ("DPM++ 2M Karras", the names other Stable
Diffusion tools use) to a diffusers scheduler class name and the keyword arguments
that make it that sampler. The UI, the CLI, the config validation and the tests all
read this one table. Importing this module does not import torch or diffusers.

A loaded pipeline is offered only the entries its scheduler declares compatible
(``pipe.scheduler.compatibles``); distilled samplers (LCM) only when the model ships
with them. Swapping builds the new scheduler from the model's *own* scheduler config
(``Cls.from_config(config, **kwargs)``), so settings never leak from one choice to the
next and the model itself is never reloaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from studio.errors import ConfigError

#: The entry that puts back the scheduler the model was saved with.
DEFAULT_SCHEDULER = "Default (model's own)"


@dataclass(frozen=True)
class SchedulerEntry:
    """One row of the catalogue.

    Attributes:
        class_name: diffusers scheduler class, e.g. "DPMSolverMultistepScheduler".
        kwargs: Config overrides that make this sampler (e.g. use_karras_sigmas=True).
        family: "diffusion" (noise-prediction schedulers) or "flow" (flow matching).
        own_only: Offered only when the model ships with this very class (distilled
            samplers such as LCM, which need weights trained for them).
        requires: Python module the class needs at run time ("" for none).
    """

    class_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "diffusion"
    own_only: bool = False
    requires: str = ""


_KARRAS = {"use_karras_sigmas": True}

#: Display name -> entry. The order is the order of the dropdown.
SCHEDULERS: dict[str, SchedulerEntry] = {
    "Euler": SchedulerEntry("EulerDiscreteScheduler"),
    "Euler a": SchedulerEntry("EulerAncestralDiscreteScheduler"),
    "Heun": SchedulerEntry("HeunDiscreteScheduler"),
    "LMS": SchedulerEntry("LMSDiscreteScheduler"),
    "LMS Karras": SchedulerEntry("LMSDiscreteScheduler", _KARRAS),
    "DPM2": SchedulerEntry("KDPM2DiscreteScheduler"),
    "DPM2 Karras": SchedulerEntry("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": SchedulerEntry("KDPM2AncestralDiscreteScheduler"),
    "DPM2 a Karras": SchedulerEntry("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": SchedulerEntry("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "DPM++ 2M Karras": SchedulerEntry("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", **_KARRAS}),
    "DPM++ 2M SDE": SchedulerEntry("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": SchedulerEntry("DPMSolverMultistepScheduler",
                                          {"algorithm_type": "sde-dpmsolver++", **_KARRAS}),
    "DPM++ SDE": SchedulerEntry("DPMSolverSDEScheduler", requires="torchsde"),
    "DPM++ SDE Karras": SchedulerEntry("DPMSolverSDEScheduler", _KARRAS, requires="torchsde"),
    "DDIM": SchedulerEntry("DDIMScheduler"),
    "PLMS": SchedulerEntry("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": SchedulerEntry("UniPCMultistepScheduler"),
    "DEIS": SchedulerEntry("DEISMultistepScheduler"),
    "DDPM": SchedulerEntry("DDPMScheduler"),
    "LCM": SchedulerEntry("LCMScheduler", own_only=True),
    "Flow Match Euler": SchedulerEntry("FlowMatchEulerDiscreteScheduler", family="flow"),
    "Flow Match Euler Karras": SchedulerEntry("FlowMatchEulerDiscreteScheduler", _KARRAS, family="flow"),
    "Flow Match Heun": SchedulerEntry("FlowMatchHeunDiscreteScheduler", family="flow"),
    "Flow Match LCM": SchedulerEntry("FlowMatchLCMScheduler", family="flow", own_only=True),
}

#: Every name a config may carry: the model's own default first, then the table.
SCHEDULER_NAMES: tuple[str, ...] = (DEFAULT_SCHEDULER, *SCHEDULERS)

#: Attribute under which a pipeline keeps the scheduler config it was loaded with.
_DEFAULT_CONFIG_ATTR = "_studio_default_scheduler_config"
_DEFAULT_CLASS_ATTR = "_studio_default_scheduler_class"


def entry_available(name: str) -> bool:
    """True when the entry's run-time dependency (e.g. torchsde) is importable."""
    entry = SCHEDULERS[name]
    return not entry.requires or importlib.util.find_spec(entry.requires) is not None


def remember_default(pipe: Any) -> None:
    """Record the pipeline's own scheduler (class and config) so it can be put back.

    Called once right after loading; later calls keep the first record.
    """
    if getattr(pipe, _DEFAULT_CONFIG_ATTR, None) is None:
        setattr(pipe, _DEFAULT_CONFIG_ATTR, dict(pipe.scheduler.config))
        setattr(pipe, _DEFAULT_CLASS_ATTR, type(pipe.scheduler))


def _default_class(pipe: Any) -> type:
    remember_default(pipe)
    return getattr(pipe, _DEFAULT_CLASS_ATTR)


def _is_flow(cls: type) -> bool:
    return cls.__name__.startswith("FlowMatch")


def is_compatible(pipe: Any, name: str) -> bool:
    """Whether the table entry ``name`` may drive ``pipe`` (see the module docstring)."""
    if name == DEFAULT_SCHEDULER:
        return True
    entry = SCHEDULERS.get(name)
    if entry is None or not entry_available(name):
        return False
    own = _default_class(pipe)
    if entry.own_only:
        return own.__name__ == entry.class_name
    compatible = _compatible_names(own)
    if entry.family == "flow":
        return _is_flow(own)
    return entry.class_name in compatible and not _is_flow(own)


def _compatible_names(cls: type) -> set[str]:
    """Class names diffusers lists as swappable with ``cls`` (itself included)."""
    import diffusers

    names = {cls.__name__}
    for item in getattr(cls, "_compatibles", []) or []:
        names.add(item if isinstance(item, str) else item.__name__)
    return {n for n in names if hasattr(diffusers, n)}


def scheduler_names_for(pipe: Any) -> list[str]:
    """The display names offered for ``pipe``: its own default, then compatible entries.

    Args:
        pipe: A loaded diffusers pipeline with a ``scheduler``.
    """
    return [DEFAULT_SCHEDULER] + [name for name in SCHEDULERS if is_compatible(pipe, name)]


def make_scheduler(pipe: Any, name: str) -> Any:
    """Build the scheduler ``name`` for ``pipe`` from the model's own scheduler config.

    Raises:
        ConfigError: for an unknown name, a missing dependency, or an entry the
            model's scheduler is not compatible with.
    """
    import diffusers

    remember_default(pipe)
    base_config = getattr(pipe, _DEFAULT_CONFIG_ATTR)
    if name == DEFAULT_SCHEDULER:
        return _default_class(pipe).from_config(base_config)
    if name not in SCHEDULERS:
        raise ConfigError(f"Unknown scheduler {name!r}. Choose one of: {', '.join(SCHEDULER_NAMES)}.")
    entry = SCHEDULERS[name]
    if not entry_available(name):
        raise ConfigError(f"The {name} scheduler needs the Python package {entry.requires!r}.",
                          f"Install it with `pip install {entry.requires}` or pick another scheduler.")
    if not is_compatible(pipe, name):
        offered = ", ".join(scheduler_names_for(pipe))
        raise ConfigError(f"The {name} scheduler does not work with this model "
                          f"({_default_class(pipe).__name__}). Compatible: {offered}.")
    cls = getattr(diffusers, entry.class_name)
    return cls.from_config(base_config, **entry.kwargs)


def set_scheduler(pipe: Any, name: str) -> str:
    """Swap ``pipe.scheduler`` to ``name`` in place (the model is not reloaded).

    Returns:
        The name now in use.
    """
    pipe.scheduler = make_scheduler(pipe, name)
    setattr(pipe, "_studio_scheduler_name", name)
    return name


def current_scheduler_name(pipe: Any) -> str:
    """The display name last set with ``set_scheduler`` (the default when never set)."""
    return getattr(pipe, "_studio_scheduler_name", DEFAULT_SCHEDULER)


def describe_scheduler(pipe: Any, name: str) -> str:
    """The name to write into image metadata: the table name, or the class for the default."""
    if name == DEFAULT_SCHEDULER:
        return f"{_default_class(pipe).__name__.replace('Scheduler', '')} (default)"
    return name


# --------------------------------------------------------------------------- A1111 names in image metadata

#: AUTOMATIC1111 (>= 1.9) "Sampler" and "Schedule type" of each entry A1111 has; entries missing here
#: (DEIS, DDPM, flow matching) have no A1111 name and are written under "Studio sampler" only.
#: "Uniform" is A1111's plain sigma spacing; it is written where A1111's "Automatic" would mean Karras
#: or exponential for that sampler (DPM++ 2M, DPM++ SDE, DPM2, DPM++ 2M SDE since 1.9).
A1111_NAMES: dict[str, tuple[str, str]] = {
    "Euler": ("Euler", "Automatic"),
    "Euler a": ("Euler a", "Automatic"),
    "Heun": ("Heun", "Automatic"),
    "LMS": ("LMS", "Automatic"),
    "LMS Karras": ("LMS", "Karras"),
    "DPM2": ("DPM2", "Uniform"),
    "DPM2 Karras": ("DPM2", "Karras"),
    "DPM2 a": ("DPM2 a", "Uniform"),
    "DPM2 a Karras": ("DPM2 a", "Karras"),
    "DPM++ 2M": ("DPM++ 2M", "Uniform"),
    "DPM++ 2M Karras": ("DPM++ 2M", "Karras"),
    "DPM++ 2M SDE": ("DPM++ 2M SDE", "Uniform"),
    "DPM++ 2M SDE Karras": ("DPM++ 2M SDE", "Karras"),
    "DPM++ SDE": ("DPM++ SDE", "Uniform"),
    "DPM++ SDE Karras": ("DPM++ SDE", "Karras"),
    "DDIM": ("DDIM", "Automatic"),
    "PLMS": ("PLMS", "Automatic"),
    "UniPC": ("UniPC", "Automatic"),
    "LCM": ("LCM", "Automatic"),
}

#: Samplers whose "Automatic" schedule is Karras in A1111 >= 1.9 (read back as the Karras entry).
_A1111_AUTOMATIC_KARRAS = ("DPM++ 2M", "DPM++ SDE", "DPM2", "DPM2 a")


def equivalent_entry(pipe: Any) -> str | None:
    """The table entry the pipeline's own scheduler is (class and settings), or None."""
    own = _default_class(pipe).__name__
    config = getattr(pipe, _DEFAULT_CONFIG_ATTR, None) or {}
    best, matched = None, -1
    for name, entry in SCHEDULERS.items():
        if entry.class_name != own:
            continue
        if not all(config.get(k) == v for k, v in entry.kwargs.items()):
            continue
        if not entry.kwargs.get("use_karras_sigmas") and config.get("use_karras_sigmas"):
            continue
        if own == "PNDMScheduler" and not config.get("skip_prk_steps"):
            continue  # PNDM with Runge-Kutta warm-up steps is not PLMS
        if len(entry.kwargs) > matched:
            best, matched = name, len(entry.kwargs)
    return best


def a1111_sampler(pipe: Any, name: str) -> tuple[str, str] | None:
    """("Sampler", "Schedule type") as A1111 >= 1.9 writes them for ``name`` on ``pipe``, or None."""
    entry = equivalent_entry(pipe) if name == DEFAULT_SCHEDULER else name
    return A1111_NAMES.get(entry) if entry else None


def from_a1111(sampler: str, schedule: str = "") -> str | None:
    """The table entry for an A1111 sampler (old "DPM++ 2M Karras" or new "DPM++ 2M" + "Karras"), or None."""
    sampler, schedule = sampler.strip(), schedule.strip()
    if not schedule and sampler in SCHEDULERS:
        return sampler  # the old combined form, or a studio name
    if schedule.lower() == "karras" or (schedule.lower() == "automatic" and sampler in _A1111_AUTOMATIC_KARRAS):
        karras = f"{sampler} Karras"
        return karras if karras in SCHEDULERS else None
    if schedule.lower() in ("", "automatic", "uniform"):
        return sampler if sampler in A1111_NAMES and A1111_NAMES[sampler][0] == sampler else None
    return None
