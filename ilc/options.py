"""The valid range of every numeric option, defined once: the settings validate against it and `--help` states it.

An option is checked before any work starts (model load, calibration, evaluation). A value out of range raises
`OptionError` naming the option (``--seq-len must be >= 16, got 8``), which the CLI prints as one line, exit 2.

Settings dataclasses (`CalibrationSettings`, `AdaptConfig`, ...) declare their command-line options with `option`:
the field's default, help text and choices live in the field (`field(metadata=...)`), its range in `RANGES` under
the field's name. `add_options` turns such a dataclass into argparse arguments, `from_args` builds it back from
the parsed arguments, and `check_ranges` checks every ranged field, so nothing is typed twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


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
    "selection_pool": Range(1),
    "residual": Range(0),
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
}


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def check(field: str, value, name: str | None = None) -> None:
    """Check one option against RANGES (`name` defaults to the CLI flag of `field`)."""
    RANGES[field].check(name or flag(field), value)


def help_range(field: str) -> str:
    return RANGES[field].text()


def check_context(name: str, tokens: int, context: int | None) -> None:
    """OptionError if `tokens` (the option `name`) exceed the model's `context` (None or 0: unknown, not checked)."""
    if context and tokens > context:
        raise OptionError(f"{name} {tokens} exceeds the model's context of {context} tokens")


def enum_words(enum) -> tuple[str, ...]:
    """The words of a str Enum (`ilc.runtime.heads.Mode`) as plain strings: CLI choices, messages, settings."""
    return tuple(member.value for member in enum)


# ------------------------------------------------------------------------------------------ options from settings
def option(default: Any = None, help: str = "", *, choices: Callable[[], Any] | None = None,
           shown_default: str | None = None, cli: bool = True, positional: bool = False,
           parse: Callable[[str], Any] | None = None):
    """A settings field that is also a command-line option. `help` says what it does; `--help` adds the range
    (`RANGES[field name]`, when there is one) and the default (`shown_default` says what a None default means);
    argparse shows the choices. `choices`: a function returning the allowed values (a registry's names, read when
    the parser is built). `cli=False`: a setting with no option. `positional`: an optional positional argument.
    `parse`: the argparse type when the field's type is not enough (e.g. `plot_path`). The option's name is the
    field's (``seq_len`` -> ``--seq-len``). Mutable defaults (tuples are fine) are not supported."""
    metadata = {"help": help, "choices": choices, "shown_default": shown_default, "cli": cli,
                "positional": positional, "parse": parse}
    return dataclasses.field(default=default, metadata={"option": metadata})


def comma_list(text: str) -> tuple[str, ...]:
    """``a,b`` -> ("a", "b") (blanks dropped); the type of tuple-valued options."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def option_fields(cls) -> list[dataclasses.Field]:
    """The fields of a settings dataclass that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("option", {}).get("cli")]


def _help(f: dataclasses.Field, meta: dict) -> str:
    parts = [meta["help"]] if meta["help"] else []
    if f.name in RANGES:
        parts.append(RANGES[f.name].text())
    if meta["shown_default"] is not None:
        parts.append(f"default: {meta['shown_default']}")
    elif f.default is not None and f.default is not False:
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        parts.append(f"default {shown}")
    return "; ".join(parts).replace("%", "%%")  # argparse %-formats help texts


def _without_none(hint):
    """X for a hint `X | None`, else the hint itself."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and len(typing.get_args(hint)) == 2 else hint


def _value_kwargs(hint) -> dict:
    """argparse keywords for a field of type `hint`: bool (a switch), int, float, str, tuple[str, ...] (a comma
    list), list[str] (one or more values), each optionally `| None`."""
    hint = _without_none(hint)
    origin = typing.get_origin(hint)
    if hint is bool:
        return {"action": "store_true"}
    if origin is list:
        return {"nargs": "+", "type": typing.get_args(hint)[0]}
    if origin is tuple:
        return {"type": comma_list}
    return {"type": hint}


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """An argparse argument for every option field of the settings dataclass `cls`: type, default and help from
    the field, choices from its registry."""
    hints = typing.get_type_hints(cls)
    for f in option_fields(cls):
        meta = f.metadata["option"]
        kwargs = {"help": _help(f, meta), "default": f.default, **_value_kwargs(hints[f.name])}
        if meta["parse"] is not None:
            kwargs["type"] = meta["parse"]
        if meta["choices"] is not None:
            kwargs["choices"] = list(meta["choices"]())
        if meta["positional"]:
            parser.add_argument(f.name, nargs="?", **kwargs)
        else:
            parser.add_argument(flag(f.name), dest=f.name, **kwargs)


def from_args(cls, args: argparse.Namespace):
    """The settings dataclass `cls` built from parsed arguments (its option fields; the others keep defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in option_fields(cls)})


def check_ranges(settings) -> None:
    """Check every field of a settings dataclass that has a range in RANGES (OptionError naming its flag)."""
    for f in dataclasses.fields(settings):
        if f.name in RANGES:
            check(f.name, getattr(settings, f.name))


def check_plot_path(path: str | Path, what: str = "--plot") -> None:
    """matplotlib is installed and writes the format the suffix names, so that the file written is `path` itself
    (matplotlib would add ``.png`` to a name without a suffix)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise OptionError(f"{what} needs matplotlib: pip install 'ilc[plot]'") from None
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        given = f"format '{suffix}' is not one matplotlib writes" if suffix else "no suffix names the format"
        raise OptionError(f"{what} {path}: {given}; use .png or one of .{', .'.join(formats)}")


def plot_path(text: str) -> str:
    """argparse type of a `--plot` option: the format is checked when the command line is parsed."""
    try:
        check_plot_path(text, "")
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None
    return text


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
