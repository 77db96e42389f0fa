"""The valid range of every numeric option, defined once: the settings validate against it and `--help` states it.

An option is checked before any work starts (model load, calibration, evaluation). A value out of range raises
`OptionError` naming the option (``--seq-len must be >= 16, got 8``), which the CLI prints as one line, exit 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class OptionError(ValueError):
    """A command-line option or API argument is out of its range, or an output path cannot be written."""


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # (lo, ...: lo itself is not allowed
    hi_open: bool = False

    def text(self) -> str:
        if self.hi is None:
            return f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def check(self, name: str, value) -> None:
        """Raise OptionError unless `value` is in range; `name` as the user wrote it (``--seq-len``)."""
        if value is not None and not self.contains(value):
            raise OptionError(f"{name} must be {self.text()}, got {value}")


RANGES = {
    # ilc calibrate
    "seq_len": Range(16),
    "samples": Range(1),
    "query_rows": Range(1),
    "min_similarity": Range(0, 1, lo_open=True, hi_open=True),  # 0 lets anything share, 1 nothing
    "target_saving": Range(0, 1, lo_open=True, hi_open=True),  # --kinds follower: below 0.5 (checked apart)
    "target_context": Range(1),
    "max_group_size": Range(1),
    "sinks": Range(0),
    "window": Range(1),
    "window_mass": Range(0, 1, lo_open=True, hi_open=True),
    "max_error": Range(0, 1),
    "keep": Range(0, 1, lo_open=True, hi_open=True),  # share of the distant tokens token selection keeps
    "selection_window": Range(1),
    "retrieval_samples": Range(0),
    "seed": Range(0),
    # ilc adapt
    "tokens": Range(1),
    "lr": Range(0, 1, lo_open=True),
    "rank": Range(1),
    "retrieval_share": Range(0, 1, hi_open=True),
    "proximal_weight": Range(0, 1),
    "lm_weight": Range(0),
    "warmup_steps": Range(0),
    "checkpoint_every": Range(1),
    # ilc inspect
    "context": Range(1),
    "batch": Range(1),
    # ilc eval, ilc generate
    "lengths": Range(64),
    "depths": Range(0, 100),
    "limit": Range(1),
    "max_new_tokens": Range(1, 4096),
    "prompt_tokens": Range(64),
    "new_tokens": Range(1, 4096),
    # runtime (plan.apply)
    "skip_threshold": Range(0, 1, lo_open=True),
}


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def check(field: str, value, name: str | None = None) -> None:
    """Check one option against RANGES (`name` defaults to the CLI flag of `field`)."""
    RANGES[field].check(name or flag(field), value)


def help_range(field: str) -> str:
    return RANGES[field].text()


def check_writable(path: str | Path, what: str, directory: bool = False) -> None:
    """Fail now, before any work, if `path` (a file, or with directory=True a folder) cannot be written: create
    the missing folders and a probe file, then remove what was created (permission bits alone mislead root)."""
    import tempfile

    path = Path(path).expanduser()
    folder = path if directory else path.parent
    if not directory and path.is_dir():
        raise OptionError(f"{what} {path}: is a directory")
    created = []
    probe = folder
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        for d in reversed(created):
            d.mkdir()
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ilc-probe-"):
            pass
        if path.exists() and not directory:
            with open(path, "ab"):
                pass
    except OSError as exc:
        raise OptionError(f"{what} {path}: cannot be written ({exc.strerror or exc})") from None
    finally:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                pass


def check_device(name: str, what: str = "--device") -> None:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``), checked before the model loads."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise OptionError(f"{what} {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise OptionError(f"{what} {name}: no such CUDA device on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"{what} {name}: MPS is not available on this machine")
