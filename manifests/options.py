"""Option specs: a stage config's options as plain data, for the command line and pipeline files alike.

Each stage's config class declares its options next to its fields (``ExtractConfig.OPTIONS``: name,
type, default, help) and builds itself from their values (``ExtractConfig.from_options(values, out)``;
``out`` is the stage's output folder, for an option that writes under it: filter's
``decontaminate``, into ``OUT/_reference`` unless its ``reference-root`` says where). The ``wit``
command line makes its click options from these specs (``wit.pipeline.clikit``) and ``wit run``
checks a pipeline file's sections against them, so an option, its default and its help are written
once. A number's bounds are the config class's to enforce (:class:`Option`). This module knows
nothing of click.

Kinds of value, and what :meth:`Option.check` accepts for each (a pipeline file gives YAML values,
the command line gives what click parsed):

- ``int``, ``float``, ``bool``, ``str`` (``choices`` restricts a string)
- ``path``: a URL; a relative path is resolved against ``base`` (the pipeline file's folder, or the
  working directory on the command line)
- ``strs``: a list of strings, or one comma-separated string (``--languages en,de``)
- ``paths``: a list of URLs, each resolved as ``path``
- ``refs``: a list of ``[TASK=]URL`` (``--reference-images``), the URL resolved as ``path``
- ``name_or_path``: a built-in name, or a file (``.json``, ``.yaml``, ``.yml``) resolved as ``path``
- ``suite``: as ``name_or_path``, or an inline list of tasks (kept as YAML text)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import storage

KINDS = ("int", "float", "bool", "str", "path", "strs", "paths", "refs", "name_or_path", "suite")
FILE_SUFFIXES = (".json", ".yaml", ".yml")  # what makes a name_or_path value a file


@dataclass(frozen=True, slots=True)
class Option:
    """One option of a stage: ``name`` as the command line spells it (``per-query-cap``).

    A pipeline file takes the same name, with dashes or underscores. ``default`` None means the
    option may be left unset (null). ``low``/``high`` bound a number (``low_open``: strictly above):
    they mirror the config class's own validation, which is where the bound is enforced (its
    ``__post_init__``, so a config built any way is checked once, with its own message); the
    command line shows them in the help and click checks them as it parses. :meth:`check` leaves
    them to the config; :meth:`check_bounds` is for an option that no config class holds (workers).
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    metavar: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: unknown kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        if self.kind == "bool" and self.default is not False:
            raise ValueError(f"option {self.name}: a bool option is a flag, off by default")

    @property
    def key(self) -> str:
        """The Python name: ``per_query_cap``."""
        return option_key(self.name)

    @property
    def optional(self) -> bool:
        return self.default is None

    @property
    def is_list(self) -> bool:
        return self.kind in ("strs", "paths", "refs")

    def check(self, value: Any, where: str = "", base: str = ".") -> Any:
        """``value`` type-checked and normalised (lists as tuples, paths resolved against ``base``).

        Bounds are not checked here: the config class checks them (see the class docstring).
        Checking a value that is already checked gives it back unchanged, so a config class may
        check what the command line or a pipeline file checked before.
        """
        name = f"{where}.{self.name}" if where else self.name
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"{name}: needs a value")
        kind = self.kind
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        if kind in ("str", "path", "name_or_path") and not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        if kind in ("int", "float"):
            return float(value) if kind == "float" else value
        if self.choices and value not in self.choices:
            raise ValueError(f"{name}: expected one of {', '.join(self.choices)}, got {value!r}")
        if kind == "path":
            return resolve(base, value)
        if kind == "name_or_path":
            return resolve(base, value) if value.endswith(FILE_SUFFIXES) else value
        if self.is_list:
            return self._check_list(name, value, base)
        if kind == "suite":
            if isinstance(value, str):
                return resolve(base, value) if value.endswith(FILE_SUFFIXES) else value
            if isinstance(value, (list, dict)):
                import yaml

                return yaml.safe_dump(value, sort_keys=True)
            raise ValueError(f"{name}: expected a suite name, a suite file or a list of tasks, got {value!r}")
        return value

    def check_bounds(self, value: Any, where: str = "") -> Any:
        """``value`` (already :meth:`check`-ed) within ``low``/``high``, for an option whose bound no
        config class enforces (the executor's ``workers``); gives the value back."""
        name = f"{where}.{self.name}" if where else self.name
        if value is not None and self.kind in ("int", "float"):
            self._check_range(name, value)
        return value

    def _check_range(self, name: str, value: float) -> None:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        if not low_ok or (self.high is not None and value > self.high):
            lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
            hi = "" if self.high is None else f"<= {self.high:g}"
            raise ValueError(f"{name}: must be {' and '.join(p for p in (lo, hi) if p)}, got {value!r}")

    def _check_list(self, name: str, value: Any, base: str) -> tuple[str, ...]:
        # a list, or one comma-separated string (as the command line takes --languages en,de)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if self.kind == "strs" else [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name}: expected a list of strings, got {value!r}")
        value = [v.strip() for v in value]
        if self.kind == "paths":
            return tuple(resolve(base, v) for v in value)
        if self.kind == "refs":
            out = []
            for v in value:
                task, url = split_ref(v)
                out.append(resolve(base, url) if task is None else f"{task}={resolve(base, url)}")
            return tuple(out)
        return tuple(value)


def split_ref(entry: str) -> tuple[str | None, str]:
    """``(task, url)`` of a ``[TASK=]URL`` entry; ``task`` is None when none is given (a task name
    never holds "://", so ``s3://b/k=v`` is a URL)."""
    task, sep, url = entry.partition("=")
    return (task, url) if sep and "://" not in task else (None, entry)


def field_default(cls: type, name: str) -> Any:
    """The default of a dataclass field: for an option whose default lives on another class's field
    (in its own class body, a field's default is simply its name)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# YAML 1.1 (PyYAML) reads 2e-3 as a string; it needs 2.0e-3. Users write 2e-3.
_EXP_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def yaml_number(value: Any) -> Any:
    """A YAML value, with a string that reads as a number in exponent form (``2e-3``) as that number."""
    return float(value) if isinstance(value, str) and _EXP_NUMBER.match(value.strip()) else value


def option_key(name: Any) -> str:
    """``per-query-cap`` and ``per_query_cap`` are the same option: ``per_query_cap``."""
    return str(name).replace("-", "_")


def resolve(base: str, path: str) -> str:
    """A path relative to ``base``, or an absolute path / URL as it is; normalised."""
    if "://" in path or path.startswith("/"):
        return storage.normalize(path)
    return storage.normalize(storage.join(base, path))


def check_options(
    options: Sequence[Option],
    values: Mapping[str, Any],
    where: str = "",
    base: str = ".",
    open_keys: bool = False,
) -> dict[str, Any]:
    """Every option's value by key: the given ones checked, the others their default.

    Keys may be spelled with dashes or underscores. A key that is no option is an error naming the
    known ones, unless ``open_keys`` (the config class checks the rest itself: TrainConfig takes
    every field of its own), in which case it is passed through as given.
    """
    by_key = {o.key: o for o in options}
    given = {option_key(k): v for k, v in values.items()}
    unknown = sorted(set(given) - set(by_key))
    if unknown and not open_keys:
        known = ", ".join(o.name for o in options)
        what = f"{where} option(s)" if where else "option(s)"
        raise ValueError(f"unknown {what} {', '.join(unknown)}; known: {known}")
    checked = {k: o.check(given[k], where, base) if k in given else o.default for k, o in by_key.items()}
    return checked | {k: given[k] for k in unknown}
