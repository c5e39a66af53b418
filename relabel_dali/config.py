"""Training configuration: YAML defaults, a YAML override file, then dotted command-line flags.

``configs/base.yaml`` (package data: ``relabel_dali/configs/base.yaml``) declares every key and, through its value, the key's type. A config file
(``--config-file-path``) and command-line flags (``--optim.lr.init 0.1`` or ``--optim.lr.init=0.1``)
may only set keys that exist there; an unknown key fails with the closest valid one. Command-line
strings are cast to the type of the value they replace, the way the official ReLabel tool does.
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from relabel_dali.atomic import atomic_write_bytes

# Package data, so that an installed (non-editable) package finds it; configs/base.yaml links here.
BASE_CONFIG = Path(__file__).resolve().parent / "configs" / "base.yaml"
TRUE_STRINGS = ("true", "t", "yes", "y", "1")
FALSE_STRINGS = ("false", "f", "no", "n", "0")
NONE_STRINGS = ("none", "null", "~")
# Flags of the launcher itself, not config keys.
RESUME_FLAG = "--resume"
CONFIG_FLAG = "--config-file-path"


class ConfigError(ValueError):
    """A config file or flag that names an unknown key or holds a value of the wrong type."""


class Config(dict):
    """A nested dict that also reads as attributes: ``cfg.optim.lr.init``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo):
        return to_config(copy.deepcopy(to_plain(self), memo))

    def get_path(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = node[part]
        return node


def to_config(value: Any) -> Any:
    if isinstance(value, dict):
        return Config({key: to_config(item) for key, item in value.items()})
    return value


def to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    return value


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level is a {type(data).__name__}, expected a mapping of sections")
    return data


def dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every leaf key ('optim.lr.init'); a dict-valued default such as model.kwargs is a leaf."""
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            keys.extend(dotted_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


def unknown_key_error(key: str, defaults: dict, source: str) -> ConfigError:
    valid = dotted_keys(defaults)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys start with {sorted(defaults)}"
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def check_type(key: str, value: Any, default: Any, source: str) -> Any:
    """Values from YAML files: the YAML type must fit the default's (int is accepted for float)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(f"{source}: {key} is {value!r} ({type(value).__name__}), "
                      f"expected {type(default).__name__} like the default {default!r}")


def merge(defaults: dict, override: dict, source: str, root: dict, prefix: str = "") -> dict:
    """``root`` is the whole default tree, so a suggestion may point into another section."""
    merged = dict(defaults)
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            raise unknown_key_error(path, root, source)
        default = defaults[key]
        if isinstance(default, dict) and default:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {path} is a section, got {value!r}")
            merged[key] = merge(default, value, source, root, path + ".")
        else:
            merged[key] = check_type(path, value, default, source)
    return merged


def cast_string(key: str, raw: str, default: Any) -> Any:
    """A command-line string -> the type of the value it replaces."""
    lowered = raw.strip().lower()
    if lowered in NONE_STRINGS and (default is None or isinstance(default, str)):
        return None
    try:
        if isinstance(default, bool):
            if lowered in TRUE_STRINGS:
                return True
            if lowered in FALSE_STRINGS:
                return False
            raise ValueError(f"expected one of {TRUE_STRINGS + FALSE_STRINGS}")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, str):
            return raw
        value = yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError) as error:
        kind = type(default).__name__
        raise ConfigError(f"command line: --{key} {raw!r} is not a valid {kind} ({error})") from None
    if isinstance(default, (list, dict)) and not isinstance(value, type(default)):
        raise ConfigError(f"command line: --{key} {raw!r} parses to {type(value).__name__}, "
                          f"expected a YAML {type(default).__name__}")
    return value


def split_flags(argv: list[str]) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """argv -> (config file, resume, [(dotted key, raw value)]). Accepts ``--k v`` and ``--k=v``."""
    config_file, resume, overrides = None, None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"command line: unexpected argument {arg!r}; flags look like --optim.epochs 300")
        if "=" in arg:
            flag, value = arg.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: {arg} needs a value")
            flag, value = arg, argv[i + 1]
            i += 2
        if flag in (CONFIG_FLAG, "--config_file_path"):
            config_file = value
        elif flag == RESUME_FLAG:
            resume = value
        else:
            overrides.append((flag[2:], value))
    return config_file, resume, overrides


def set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        tree = tree[part]
    tree[parts[-1]] = value


def lookup_default(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    if isinstance(node, dict) and node:
        raise KeyError(dotted)
    return node


def load_config(config_file: str | os.PathLike | None = None,
                overrides: list[tuple[str, str]] | dict | None = None,
                base_file: str | os.PathLike = BASE_CONFIG) -> Config:
    """base.yaml <- config_file <- overrides (dotted key -> command-line string, cast here)."""
    defaults = read_yaml(base_file)
    tree = merge(defaults, read_yaml(config_file), str(config_file), defaults) if config_file else defaults
    items = overrides.items() if isinstance(overrides, dict) else (overrides or [])
    for key, raw in items:
        try:
            lookup_default(defaults, key)  # the base config decides what is a key (model.kwargs is one)
        except KeyError:
            raise unknown_key_error(key, defaults, "command line") from None
        current = Config.get_path(tree, key)
        value = raw if not isinstance(raw, str) else cast_string(key, raw, current)
        set_path(tree, key, value)
    return to_config(tree)


def check_values(cfg: Config) -> None:
    """Values that would otherwise fail late (after a whole epoch) or with a traceback; the data
    settings' values are checked where they are built (``settings.DataSettings.from_config``)."""
    positive = ("optim.batch_size", "optim.epochs", "util.val_batch_size", "util.val_every", "util.print_freq")
    for key in positive:
        value = cfg.get_path(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    root = Path(cfg.data.data_path)
    folders = [cfg.data.val_folder] if cfg.util.test_only else [cfg.data.train_folder, cfg.data.val_folder]
    for folder in folders:
        if not (root / folder).is_dir():
            raise ConfigError(f"data.data_path: {root / folder} is not a folder (data.data_path={str(root)!r}, "
                              f"folder {folder!r})")
    if cfg.data.relabel.use and cfg.data.relabel.path and not cfg.util.test_only:
        path = Path(cfg.data.relabel.path)  # an empty path is refused with the data settings
        if not path.exists():
            raise ConfigError(f"data.relabel.path: {path} does not exist (pack label maps with "
                              f"tools/pack_labels.py, or set --data.relabel.use false)")


def parse_command_line(argv: list[str]) -> tuple[Config, str | None]:
    """``train.py`` arguments -> (resolved config, resume: None, a path or 'auto')."""
    config_file, resume, overrides = split_flags(argv)
    return load_config(config_file, overrides), resume


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config atomically; it loads back with load_config(path)."""
    text = yaml.safe_dump(to_plain(cfg), sort_keys=False, default_flow_style=False)
    atomic_write_bytes(Path(path), text.encode())
