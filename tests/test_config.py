"""Tests of the typed params loading."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvc.utils.serialize import parse_yaml

from cadalign.config import (
    SECTIONS,
    CityConfig,
    ConfigError,
    check_name,
    load_cities,
    load_city,
    load_section,
    read_params,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Inner:
    a: int = 1


@dataclass(frozen=True)
class Outer:
    rate: float
    inner: Inner = Inner()
    names: tuple[str, ...] = ()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_load_nested_and_types(tmp_path: Path) -> None:
    p = write(tmp_path, "noise:\n  rate: 2\n  inner: {a: 5}\n  names: [x, y]\n")
    cfg = load_section(p, "noise", Outer)
    assert cfg == Outer(rate=2.0, inner=Inner(a=5), names=("x", "y"))


def test_unknown_key_is_named(tmp_path: Path) -> None:
    p = write(tmp_path, "noise:\n  rate: 1\n  inner: {a: 5, b: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'noise.inner.b'"):
        load_section(p, "noise", Outer)


def test_missing_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"noise.rate: required"):
        load_section(write(tmp_path, "noise: {}\n"), "noise", Outer)
    with pytest.raises(ConfigError, match=r"noise.rate: expected a number"):
        load_section(write(tmp_path, "noise: {rate: fast}\n"), "noise", Outer)
    with pytest.raises(ConfigError, match="missing section 'draw'"):
        load_section(write(tmp_path, "noise: {rate: 1}\n"), "draw", Outer)
    with pytest.raises(ConfigError, match="params file not found"):
        load_section(tmp_path / "none.yaml", "noise", Outer)


def test_cities(tmp_path: Path) -> None:
    p = write(tmp_path, "cities:\n  a-1: {source: synthetic, tiles: [1, 2]}\n  b: {source: inria, tiles: [3]}\n")
    assert load_city(p, "a-1") == CityConfig(source="synthetic", tiles=(1, 2))
    assert set(load_cities(p)) == {"a-1", "b"}
    bad = write(tmp_path, "cities:\n  a: {source: ftp, tiles: [1]}\n")
    with pytest.raises(ConfigError, match="'ftp' is not one of"):
        load_cities(bad)
    with pytest.raises(ConfigError, match="tiles is empty"):
        load_cities(write(tmp_path, "cities:\n  a: {source: inria, tiles: []}\n"))


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "a b", ".."])
def test_bad_city_names(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid city name"):
        check_name(name)


@dataclass(frozen=True)
class Optim:
    lr: float = 0.1
    steps: int = 1


@dataclass(frozen=True)
class Train:
    optim: Optim = Optim()
    sizes: tuple[float, ...] = ()


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("train:\n  optim: {lr: .nan}\n", "train.optim.lr", "nan"),
        ("train:\n  optim: {lr: -.inf}\n", "train.optim.lr", "-inf"),
        ("train:\n  sizes: [1.0, .inf]\n", "train.sizes[1]", "inf"),
    ],
)
def test_numbers_must_be_finite(tmp_path: Path, text: str, key: str, value: str) -> None:
    p = write(tmp_path, text)
    message = f"{p}: {key}: {value} is not a finite number; give a finite value"
    with pytest.raises(ConfigError) as err:
        load_section(p, "train", Train)
    assert str(err.value) == message


def test_numbers_are_read_as_dvc_reads_them(tmp_path: Path) -> None:
    text = "train:\n  optim: {lr: 1e-3, steps: 1_000}\n  sizes: [2.5E+2, 1e3]\n"
    p = write(tmp_path, text)
    assert read_params(p) == parse_yaml(text, str(p))  # DVC's own reader
    assert load_section(p, "train", Train) == Train(optim=Optim(lr=0.001, steps=1000), sizes=(250.0, 1000.0))
    for params in (ROOT / "params.yaml", ROOT / "pipelines" / "toy" / "params.yaml"):
        assert read_params(params) == parse_yaml(params.read_text(), str(params))


def test_duplicate_keys_are_named_with_their_line(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  optim:\n    lr: 0.1\n    steps: 5\n    lr: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_section(p, "train", Train)
    assert str(err.value) == f"{p}, line 5: duplicate key 'train.optim.lr' (first on line 3); keep one"
    p = write(tmp_path, "cities:\n  a: {source: inria, tiles: [1]}\ncities:\n  b: {source: inria, tiles: [2]}\n")
    with pytest.raises(ConfigError) as err:
        load_cities(p)
    assert str(err.value) == f"{p}, line 3: duplicate key 'cities' (first on line 1); keep one"


def test_unknown_sections_are_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "train: {}\nnosie: {max_displacement: 8}\ncities:\n  a: {source: inria, tiles: [1]}\n")
    message = f"{p}: unknown section 'nosie'; the sections are {sorted(SECTIONS)} (a new one goes into cadalign.config.SECTIONS)"
    for load in (lambda: load_section(p, "train", Train), lambda: load_cities(p)):
        with pytest.raises(ConfigError) as err:
            load()
        assert str(err.value) == message


def test_sections_are_those_the_stages_read() -> None:
    """SECTIONS holds every section a module reads and every section of the committed params files."""
    read = set()
    for path in (ROOT / "src" / "cadalign").rglob("*.py"):
        text = path.read_text()
        read |= set(re.findall(r"load_section\([^,]+,\s*\"(\w+)\"", text))
        read |= set(re.findall(r"read_params\([^)]*\)(?:\.get\(|\[)\"(\w+)\"", text))
    read -= {"defaults"}  # conf/config.yaml, Hydra's defaults list: not a params file
    assert read == set(SECTIONS) - {"cities"}  # cities: load_cities
    in_files = set()
    for params in (ROOT / "params.yaml", ROOT / "pipelines" / "toy" / "params.yaml", *(ROOT / "conf" / "preset").glob("*.yaml")):
        in_files |= set(read_params(params)) - {"defaults"}  # a preset's own defaults list (Hydra)
    assert in_files <= set(SECTIONS)
