"""Typed, frozen stage configurations read from ``params.yaml``.

Each stage declares one frozen dataclass and builds it once with :func:`load_section`.
Unknown keys are rejected with the key's full dotted name (top-level sections against
:data:`SECTIONS`), missing required keys are named, duplicate keys are refused with their
line, and values are checked against the annotated type (numbers must be finite), so a
typo in ``params.yaml`` fails loudly instead of being silently ignored. The file is read as
DVC reads it (ruamel.yaml, YAML 1.2: ``1e-3`` is a number, ``yes`` a string), so a stage
sees the values that ``dvc params diff`` and ``dvc exp run -S`` see.

Example::

    @dataclass(frozen=True)
    class NoiseConfig:
        max_displacement: float = 16.0
        n_bumps: int = 30

    cfg = load_section("params.yaml", "noise", NoiseConfig)
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from ruamel.yaml import YAML, MappingNode, SequenceNode
from ruamel.yaml.error import YAMLError

T = TypeVar("T")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

SECTIONS = (
    "cities", "synthetic", "inria", "files", "noise", "train", "realign", "evaluate", "similarity", "draw", "rounds",
    "toy", "download",
)
"""The top-level sections of params.yaml that some stage reads; any other name is refused as a
typo. A new section is added here (tests/test_config.py checks this list against the stages)."""


class ConfigError(ValueError):
    """A params file is missing, malformed, or has a bad key or value."""


def read_params(path: str | Path) -> dict[str, Any]:
    """Read a YAML params file into a dict, as DVC reads it (``dvc.utils.serialize.parse_yaml``).

    Raises:
        ConfigError: if the file does not exist, is not a YAML mapping, or repeats a key
            (naming the dotted key and its line).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}; pass --params with the path to params.yaml")
    text = path.read_text()
    yaml = YAML(typ="safe")  # DVC's loader: YAML 1.2
    try:
        _check_duplicates(yaml.compose(text), path)
        data = yaml.load(text)
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}); fix the syntax") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def _check_duplicates(node: Any, path: Path, prefix: str = "") -> None:
    """Refuse a key that appears twice in one mapping: YAML loaders would keep one silently or fail."""
    if isinstance(node, MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            dotted = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{path}, line {line}: duplicate key '{dotted}' (first on line {seen[key]}); keep one")
            seen[key] = line
            _check_duplicates(value_node, path, dotted)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, path, f"{prefix}[{i}]")


def _check_sections(data: dict[str, Any], path: str | Path) -> None:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown section '{unknown[0]}'; the sections are {sorted(SECTIONS)} "
            "(a new one goes into cadalign.config.SECTIONS)"
        )


def load_section(path: str | Path, section: str, cls: type[T]) -> T:
    """Build the frozen dataclass ``cls`` from section ``section`` of a params file.

    ``section`` may be dotted (``"cities.synthville"``) to reach a nested mapping.

    Raises:
        ConfigError: naming the file and the dotted key, for a missing section, an
            unknown key, a missing required key or a value of the wrong type.
    """
    data: Any = read_params(path)
    _check_sections(data, path)
    for part in section.split("."):
        if not isinstance(data, dict) or part not in data:
            raise ConfigError(f"{path}: missing section '{section}'; add it to params.yaml")
        data = data[part]
    return from_dict(cls, data if data is not None else {}, where=f"{path}: {section}")


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Recursively build dataclass ``cls`` from a mapping, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{where.split(': ', 1)[-1]}.{unknown[0]}'"
            f"; valid keys are {sorted(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}"
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing; add it to params.yaml")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
    return obj


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, key): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not a finite number; give a finite value")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r} in config dataclass")


def check_name(name: str, what: str = "city name") -> str:
    """Return ``name`` if it is a safe file-name component, else raise ConfigError.

    Names become folder and file names, so path separators, ``..`` and spaces are refused.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ConfigError(
            f"invalid {what} {name!r}: use letters, digits, '-' and '_' only "
            "(no path separators or '..')"
        )
    return name


SOURCES = ("synthetic", "inria", "files")


def _check_tiles(tiles: tuple[int, ...]) -> None:
    if not tiles:
        raise ValueError("tiles is empty; list at least one tile number, e.g. tiles: [1, 2]")
    if len(set(tiles)) != len(tiles):
        raise ValueError(f"tiles has repeated numbers: {list(tiles)}")
    if min(tiles) < 1:
        raise ValueError(f"tile numbers start at 1, got {list(tiles)}")


@dataclass(frozen=True)
class CityConfig:
    """One city of the study (an entry of ``cities:`` in params.yaml).

    ``tiles`` are tile numbers: Inria's 1..36, or 1..n for a synthetic city. ``style``
    applies to synthetic cities only (dense, suburb, industrial).
    """

    source: Literal["synthetic", "inria"]
    tiles: tuple[int, ...]
    style: str = "dense"

    def validate(self) -> None:
        _check_tiles(self.tiles)


@dataclass(frozen=True)
class FilesCityConfig:
    """A city of one's own files (``source: files``; :mod:`cadalign.sources.files`, docs/real-data.md).

    Attributes:
        tiles: tile numbers n: tile n is the n-th image of ``images`` (sorted paths, 1-based).
        images: GeoTIFF paths or glob patterns (one string or a list), relative to the folder
            the stage runs in (the project root under DVC).
        polygons: one vector file of building polygons (GeoPackage, GeoJSON, Shapefile, ...;
            any CRS, it is reprojected to each tile's).
        masks: optional building masks (paths or globs), one per image with the image's file
            name, on the image's grid; nonzero = building. Empty: none.
        layer: the layer of ``polygons`` to read ("" = its only layer).
        bands: the 1-based bands of the images mapped to R, G, B: three bands, or one band
            replicated; empty = band 1 for a 1-band image, bands 1-3 otherwise.
        nodata: the value of missing pixels (None: the images' own nodata tag).
    """

    source: Literal["files"]
    tiles: tuple[int, ...]
    images: str | tuple[str, ...]
    polygons: str
    masks: str | tuple[str, ...] = ()
    layer: str = ""
    bands: tuple[int, ...] = ()
    nodata: float | None = None

    def validate(self) -> None:
        _check_tiles(self.tiles)
        if not self.images or any(not p for p in ((self.images,) if isinstance(self.images, str) else self.images)):
            raise ValueError("images is empty; give the GeoTIFF tiles: a path, a glob or a list of them")
        if not self.polygons:
            raise ValueError("polygons is empty; give the vector file of the building polygons")
        if len(self.bands) not in (0, 1, 3) or any(b < 1 for b in self.bands):
            raise ValueError(
                f"bands = {list(self.bands)}; give three 1-based band numbers (e.g. [1, 2, 3]), "
                "one (replicated to R, G, B), or [] for the default"
            )


AnyCity = CityConfig | FilesCityConfig


def _is_files(entry: Any, where: str) -> bool:
    """Whether a ``cities:`` entry is a files city; an unknown source is refused listing all of them."""
    source = entry.get("source") if isinstance(entry, dict) else None
    if source is not None and source not in SOURCES:
        raise ConfigError(f"{where}.source: {source!r} is not one of {list(SOURCES)}")
    return source == "files"


def load_city(path: str | Path, name: str) -> AnyCity:
    """The config of city ``name`` from the ``cities`` section, with the name checked."""
    check_name(name)
    data = read_params(path)
    entry = data["cities"].get(name) if isinstance(data.get("cities"), dict) else None
    if _is_files(entry, f"{path}: cities.{name}"):
        return load_section(path, f"cities.{name}", FilesCityConfig)
    return load_section(path, f"cities.{name}", CityConfig)


def load_cities(path: str | Path) -> dict[str, AnyCity]:
    """All cities of the ``cities`` section, names checked."""
    data = read_params(path)
    _check_sections(data, path)
    section = data.get("cities")
    if not isinstance(section, dict) or not section:
        raise ConfigError(f"{path}: section 'cities' is missing or empty; name at least one city")
    cities: dict[str, AnyCity] = {}
    for name, entry in section.items():
        where = f"{path}: cities.{check_name(name)}"
        cls = FilesCityConfig if _is_files(entry, where) else CityConfig
        cities[name] = from_dict(cls, entry, where)
    return cities
