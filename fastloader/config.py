"""Typed configs from YAML data: unknown keys and bad values are one-line UserErrors.

`parse(cls, data, where)` turns a mapping into the dataclass `cls`, checking
every field against its annotation (int, float, bool, str, Literal, Optional,
list, dict, nested dataclasses); every field has a default, so `{}` is valid.
`train` builds its experiment config on the same function.
"""
from __future__ import annotations

import dataclasses
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from beton.errors import UserError
from beton.paths import dataset_dir

from .augs import make_aug, pack


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 60, 60
SHOW_CHARS = 100


def _show(value) -> str:
    """A bounded repr for error lines: a huge or deeply nested value (a YAML alias bomb) stays short."""
    text = _SHORT.repr(value)
    return text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS - 3] + "..."


def _check(value, tp, where: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, where)
            except UserError:
                continue
        raise UserError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {_show(value)}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {_show(value)}")
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise UserError(f"{where}: expected null, got {_show(value)}")
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {_show(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {_show(value)}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise UserError(f"{where}: expected {tp.__name__}, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def parse(cls, data, where: str = "config"):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and ill-typed values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(names)}")
    values = {k: _check(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**values)


def to_dict(obj) -> dict:
    """The plain-data form of a config (what `config.yaml` of a run holds)."""
    return dataclasses.asdict(obj)


def default_augment() -> list:
    """The seeds' final model: RandomCrop(32, padding 4) + Cutout(16) + Rotate(5 degrees)."""
    return [{"random_crop": {"size": 32, "padding": 4}}, {"cutout": {"size": 16}}, {"rotate": {"max_degrees": 5}}]


@dataclass
class DataConfig:
    """The `data:` section of an experiment (every key has a default)."""

    dataset: Literal["cifar10", "cifar100"] = "cifar10"
    beton_dir: Optional[str] = None  # default: $FASTCIFAR_DATA/<dataset>
    batch_size: int = 512
    test_batch_size: Optional[int] = None  # default: batch_size
    workers: Optional[int] = None  # default: this machine's cores
    order: Literal["random", "quasi_random", "sequential"] = "random"
    augment: list = field(default_factory=default_augment)
    augment_where: Literal["loader", "device"] = "loader"
    seed: int = 0
    subset: Optional[int] = None  # first N training images
    val_split: Optional[int] = None  # hold out N of those training images (drawn from `seed`) as a validation split
    test_subset: Optional[int] = None  # first N test images
    drop_last: bool = True
    batches_ahead: int = 3
    os_cache: bool = True

    def __post_init__(self):
        for name in ("batch_size", "batches_ahead"):
            if getattr(self, name) < 1:
                raise UserError(f"data.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("test_batch_size", "workers", "subset", "test_subset", "val_split"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"data.{name} must be at least 1 (or null), got {v}")
        if self.seed < 0:
            raise UserError(f"data.seed must be non-negative, got {self.seed}")
        # validates each entry, and the list as a whole (sizes, fills); `fill: mean` takes the manifest's mean
        # when the loader is built, a stand-in here
        pack(self.augmentations(), mean=(0.0, 0.0, 0.0))

    def augmentations(self):
        augs = []
        for i, entry in enumerate(self.augment):
            try:
                augs.append(make_aug(entry))
            except UserError as e:
                raise UserError(f"data.augment[{i}]: {e}") from e
        return augs

    def folder(self) -> str:
        return self.beton_dir or str(dataset_dir(self.dataset))

    def num_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))
