"""Tests of the typed params loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from cadalign.config import CityConfig, ConfigError, check_name, load_cities, load_city, load_section


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
    p = write(tmp_path, "s:\n  rate: 2\n  inner: {a: 5}\n  names: [x, y]\n")
    cfg = load_section(p, "s", Outer)
    assert cfg == Outer(rate=2.0, inner=Inner(a=5), names=("x", "y"))


def test_unknown_key_is_named(tmp_path: Path) -> None:
    p = write(tmp_path, "s:\n  rate: 1\n  inner: {a: 5, b: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown key 's.inner.b'"):
        load_section(p, "s", Outer)


def test_missing_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"s.rate: required"):
        load_section(write(tmp_path, "s: {}\n"), "s", Outer)
    with pytest.raises(ConfigError, match=r"s.rate: expected a number"):
        load_section(write(tmp_path, "s: {rate: fast}\n"), "s", Outer)
    with pytest.raises(ConfigError, match="missing section 'other'"):
        load_section(write(tmp_path, "s: {rate: 1}\n"), "other", Outer)
    with pytest.raises(ConfigError, match="params file not found"):
        load_section(tmp_path / "none.yaml", "s", Outer)


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
