"""Run configuration: one schema, YAML files (with `base:` inheritance) and `--set` overrides.

Every key a run reads is declared in SCHEMA with its type, default and allowed values. Loading a
config checks and coerces every value before anything trains: a typo in a key, a string where a
number is due (YAML 1.1 reads `5e-4` as a string: it is converted here) or a value out of range
is a ConfigError that names the key, the value and what was expected. docs/training.md
describes each key.

Keys marked `neutral` cannot change what a run computes (loader workers, logging, progress
display): `--resume` accepts a change of them; a change of any other key is refused.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

from .errors import ConfigError, MissingFileError


@dataclass(frozen=True)
class Key:
    """One config value: its default, kind and limits."""

    default: object
    kind: str                      # bool | int | float | str | list[int] | list[float]
    choices: tuple = ()
    nullable: bool = False
    minimum: float | None = None   # inclusive
    maximum: float | None = None   # inclusive
    length: int | None = None      # lists: exact length
    neutral: bool = False          # may change on --resume

    def expected(self) -> str:
        words = {"bool": "a boolean (true/false)", "int": "an integer", "float": "a number",
                 "str": "a string", "list[int]": "a list of integers",
                 "list[float]": "a list of numbers"}[self.kind]
        if self.length is not None:
            words = words.replace("a list of", f"a list of {self.length}")
        if self.choices:
            words = "one of " + ", ".join(repr(c) for c in self.choices)
        if self.minimum is not None and self.maximum is not None:
            words += f" in [{self.minimum}, {self.maximum}]"
        elif self.minimum is not None:
            words += f" >= {self.minimum}"
        if self.nullable:
            words += " or null"
        return words


AMP_MODES = ("bf16", "fp16", "off")
PROGRESS_MODES = ("auto", "bar", "line", "none")
LOSSES = ("kcl", "fcl", "moco", "ce")
DATA_KINDS = ("fashion_mnist_lt", "split_list", "synthetic")
PUBLISHED_DATASETS = ("imagenet_lt", "inat2018", "places_lt")

SCHEMA = {
    "seed": Key(0, "int", minimum=0),
    "device": Key("auto", "str", choices=("auto", "cpu", "cuda")),
    # GPU speed options (no effect on the CPU).
    "amp": Key("bf16", "str", choices=AMP_MODES),
    "channels_last": Key(True, "bool"),
    "cudnn_benchmark": Key(True, "bool"),
    "compile": Key(False, "bool"),
    # Not neutral: the CPU kernels' sums depend on the number of threads (1 and 2 threads give
    # different weights after two epochs of the Fashion-MNIST config).
    "threads": Key(None, "int", nullable=True, minimum=1),
    "log_interval": Key(10, "int", minimum=1, neutral=True),
    "checkpoint_every_steps": Key(0, "int", minimum=0, neutral=True),
    "progress": Key("auto", "str", choices=PROGRESS_MODES, neutral=True),
    "tensorboard": Key(True, "bool", neutral=True),
    "data": {
        "kind": Key("fashion_mnist_lt", "str", choices=DATA_KINDS),
        "dataset": Key(None, "str", choices=PUBLISHED_DATASETS, nullable=True),
        "root": Key(None, "str", nullable=True),
        "imbalance_factor": Key(100.0, "float", minimum=1.0),
        "max_per_class": Key(6000, "int", minimum=1),
        "test_per_class": Key(None, "int", nullable=True, minimum=1),
        "subset_seed": Key(0, "int", minimum=0),
        "class_order": Key(None, "list[int]", nullable=True),
        "class_counts": Key(None, "list[int]", nullable=True, minimum=1),
        "balanced_per_class": Key(None, "int", nullable=True, minimum=1),
        "balanced_list": Key(None, "str", nullable=True),
        "image_root": Key(None, "str", nullable=True),
        "train_list": Key(None, "str", nullable=True),
        "val_list": Key(None, "str", nullable=True),
        "test_list": Key(None, "str", nullable=True),
        "num_classes": Key(None, "int", nullable=True, minimum=1),
        "synthetic_images": Key(4096, "int", minimum=1),
        "synthetic_source_size": Key(None, "int", nullable=True, minimum=1),
        "synthetic_channels": Key(3, "int", minimum=1),
        "check_files": Key(True, "bool", neutral=True),
        "image_size": Key(28, "int", minimum=1),
        "crop_scale": Key([0.08, 1.0], "list[float]", length=2, minimum=0.0, maximum=1.0),
        "mean": Key(None, "list[float]", nullable=True),
        "std": Key(None, "list[float]", nullable=True, minimum=1e-12),
        "num_workers": Key(0, "int", minimum=0, neutral=True),
        "pin_memory": Key(True, "bool", neutral=True),
        "prefetch_factor": Key(4, "int", minimum=1, neutral=True),
    },
    "model": {
        "arch": Key("small_resnet", "str"),
        "width": Key(16, "int", minimum=1),
        "blocks": Key(1, "int", minimum=1),
        "stem_stride": Key(1, "int", minimum=1),
        "norm": Key("bn", "str", choices=("bn", "gn", "none")),
        "bn_splits": Key(1, "int", minimum=1),
        "dim": Key(128, "int", minimum=1),
        "mlp_head": Key(False, "bool"),
        "momentum": Key(0.999, "float", minimum=0.0, maximum=1.0),
        "shuffle_bn": Key(True, "bool"),
    },
    "stage1": {
        "loss": Key("kcl", "str", choices=LOSSES),
        "k": Key(6, "int", minimum=1),
        "temperature": Key(0.07, "float", minimum=1e-6),
        "queue_size": Key(65536, "int", minimum=1),
        "backend": Key("auto", "str", choices=("auto", "cpu", "cuda", "triton", "reference")),
        "epochs": Key(200, "int", minimum=0),
        "batch_size": Key(256, "int", minimum=1),
        "lr": Key(0.1, "float", minimum=0.0),
        "momentum": Key(0.9, "float", minimum=0.0, maximum=1.0),
        "weight_decay": Key(5e-4, "float", minimum=0.0),
        "schedule": Key("cosine", "str", choices=("cosine", "step")),
        "milestones": Key([], "list[int]", minimum=0),
        "gamma": Key(0.1, "float", minimum=0.0),
        "checkpoint": Key(None, "str", nullable=True),
    },
    "stage2": {
        "epochs": Key(100, "int", minimum=0),
        "batch_size": Key(256, "int", minimum=1),
        "lr": Key(30.0, "float", minimum=0.0),
        "momentum": Key(0.9, "float", minimum=0.0, maximum=1.0),
        "weight_decay": Key(0.0, "float", minimum=0.0),
        "schedule": Key("step", "str", choices=("cosine", "step")),
        "milestones": Key([60, 80], "list[int]", minimum=0),
        "gamma": Key(0.1, "float", minimum=0.0),
        "init_std": Key(0.01, "float", minimum=0.0),
        "class_balanced": Key(False, "bool"),
        "samples_per_class": Key(4, "int", minimum=1),
        "augment": Key(True, "bool"),
    },
    "eval": {
        "many_threshold": Key(100, "int", minimum=0),
        "few_threshold": Key(20, "int", minimum=0),
        "sigma": Key(0.1, "float", minimum=1e-12),
        "batch_size": Key(256, "int", minimum=1, neutral=True),
        "every_epochs": Key(0, "int", minimum=0, neutral=True),
        "save_features": Key(False, "bool", neutral=True),
        "plot": Key(True, "bool", neutral=True),
    },
}


def _defaults(schema: dict) -> dict:
    return {name: _defaults(spec) if isinstance(spec, dict) else copy.deepcopy(spec.default)
            for name, spec in schema.items()}


DEFAULTS = _defaults(SCHEMA)


def _leaves(schema: dict, prefix: str = ""):
    for name, spec in schema.items():
        if isinstance(spec, dict):
            yield from _leaves(spec, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", spec


NEUTRAL_KEYS = frozenset(name for name, spec in _leaves(SCHEMA) if spec.neutral)


# ----------------------------------------------------------------------------------------------
# Type coercion
# ----------------------------------------------------------------------------------------------
def _fail(name: str, value, spec: Key):
    raise ConfigError(f"config key {name!r}: expected {spec.expected()}, got {value!r} "
                      f"({type(value).__name__})")


def _number(name: str, value, spec: Key, kind: str):
    if isinstance(value, bool):
        _fail(name, value, spec)
    if isinstance(value, str):
        try:
            value = float(value) if kind == "float" else int(value.strip())
        except ValueError:
            _fail(name, value, spec)
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                _fail(name, value, spec)
            value = int(value)
        if not isinstance(value, int):
            _fail(name, value, spec)
    else:
        if not isinstance(value, (int, float)):
            _fail(name, value, spec)
        value = float(value)
        if not math.isfinite(value):
            _fail(name, value, spec)
    if (spec.minimum is not None and value < spec.minimum) or \
            (spec.maximum is not None and value > spec.maximum):
        _fail(name, value, spec)
    return value


def coerce(name: str, value, spec: Key):
    """`value` checked and converted to the kind of `spec`; ConfigError naming `name` if not."""
    if value is None:
        if spec.nullable:
            return None
        _fail(name, value, spec)
    if spec.kind == "bool":
        if not isinstance(value, bool):
            _fail(name, value, spec)
        return value
    if spec.kind in ("int", "float"):
        return _number(name, value, spec, spec.kind)
    if spec.kind == "str":
        if not isinstance(value, str) or (spec.choices and value not in spec.choices):
            _fail(name, value, spec)
        return value
    if spec.kind.startswith("list["):
        if not isinstance(value, (list, tuple)) or \
                (spec.length is not None and len(value) != spec.length):
            _fail(name, value, spec)
        item = Key(None, spec.kind[5:-1], minimum=spec.minimum, maximum=spec.maximum)
        return [_number(f"{name}[{i}]", v, item, item.kind) for i, v in enumerate(value)]
    raise AssertionError(spec.kind)


def _merge(base: dict, update: dict, schema: dict, where: str) -> dict:
    for key, value in update.items():
        name = f"{where}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key {name!r} (known keys here: "
                              f"{', '.join(sorted(schema))})")
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name!r} must be a mapping of "
                                  f"{', '.join(sorted(schema[key]))}, got {value!r}")
            _merge(base[key], value, schema[key], name + ".")
        else:
            base[key] = coerce(name, value, schema[key])
    return base


# ----------------------------------------------------------------------------------------------
# Files and overrides
# ----------------------------------------------------------------------------------------------
def _yaml():
    import yaml
    return yaml


def read_yaml(path: str, seen: tuple = ()) -> dict:
    """A config file as a mapping, with its `base:` files merged underneath (paths relative to
    the file naming them)."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: `base:` files include each other ({' -> '.join(seen)})")
    if not os.path.isfile(path):
        raise MissingFileError(f"config file {path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            loaded = _yaml().safe_load(f)
        except _yaml().YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got "
                          f"{type(loaded).__name__}")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `base:` must name a config file, got {base!r}")
    merged = read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,))
    _deep_update(merged, loaded)
    return merged


def _deep_update(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def parse_override(text: str) -> dict:
    """'stage1.epochs=3' -> {'stage1': {'epochs': 3}} (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. stage1.epochs=3), got {text!r}")
    dotted, raw = text.split("=", 1)
    try:
        value = _yaml().safe_load(raw)
    except _yaml().YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {e}") from e
    out: dict = {}
    node = out
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set expects KEY=VALUE with a dotted key such as stage1.epochs, "
                          f"got {text!r}")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | None = None, overrides=(), base: dict | None = None) -> dict:
    """DEFAULTS, then `base` (a mapping), then the YAML file, then each `--set` override; every
    value checked against SCHEMA, then the whole checked by `validate`."""
    cfg = copy.deepcopy(DEFAULTS)
    if base:
        _merge(cfg, copy.deepcopy(base), SCHEMA, "")
    if path:
        _merge(cfg, read_yaml(path), SCHEMA, "")
    for text in overrides:
        _merge(cfg, parse_override(text), SCHEMA, "")
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """Checks that involve several keys (each key's own type and range are checked on load)."""
    s1, s2, d, e = cfg["stage1"], cfg["stage2"], cfg["data"], cfg["eval"]
    if e["few_threshold"] > e["many_threshold"] + 1:
        raise ConfigError(f"eval.few_threshold ({e['few_threshold']}) must be <= "
                          f"eval.many_threshold + 1 ({e['many_threshold'] + 1})")
    if d["crop_scale"][0] > d["crop_scale"][1]:
        raise ConfigError(f"data.crop_scale must be [low, high] with low <= high, got "
                          f"{d['crop_scale']}")
    if (d["mean"] is None) != (d["std"] is None) or \
            (d["mean"] is not None and len(d["mean"]) != len(d["std"])):
        raise ConfigError(f"data.mean and data.std must both be null or lists of the same "
                          f"length, got {d['mean']} and {d['std']}")
    if d["kind"] == "split_list":
        for key in ("image_root", "train_list", "test_list"):
            if not d[key]:
                raise ConfigError(f"data.{key} is required for data.kind split_list")
    if d["kind"] == "synthetic" and not d["num_classes"]:
        raise ConfigError("data.num_classes is required for data.kind synthetic")
    for key, kind in (("class_order", "fashion_mnist_lt"), ("class_counts", "fashion_mnist_lt"),
                      ("balanced_per_class", "fashion_mnist_lt"), ("balanced_list", "split_list")):
        if d[key] is not None and d["kind"] != kind:
            raise ConfigError(f"data.{key} applies to data.kind {kind}, not {d['kind']!r}")
    if d["class_order"] is not None and d["class_counts"] is not None:
        raise ConfigError("data.class_order and data.class_counts exclude each other: "
                          "class_counts gives every class its size directly")
    if d["kind"] == "fashion_mnist_lt":
        from .data import check_class_order, counts_by_class
        from .errors import DataError
        try:
            if d["class_order"] is not None:
                check_class_order(d["class_order"], 10)
            counts_by_class(10, d["max_per_class"], d["imbalance_factor"], d["class_order"],
                            d["class_counts"])
        except DataError as err:
            raise ConfigError(str(err)) from err
    for name, stage in (("stage1", s1), ("stage2", s2)):
        if sorted(stage["milestones"]) != stage["milestones"]:
            raise ConfigError(f"{name}.milestones must be increasing, got {stage['milestones']}")


# ----------------------------------------------------------------------------------------------
# Comparing configs (resume, stage 2 from a stage-1 checkpoint)
# ----------------------------------------------------------------------------------------------
def flatten(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(old: dict, new: dict, keys=None) -> list[tuple[str, object, object]]:
    """[(dotted key, old value, new value)] where the two configs differ (restricted to the
    dotted prefixes in `keys` when given)."""
    a, b = flatten(old), flatten(new)
    out = []
    for name in sorted(set(a) | set(b)):
        if keys is not None and not any(name == k or name.startswith(k + ".") for k in keys):
            continue
        if a.get(name, "<absent>") != b.get(name, "<absent>"):
            out.append((name, a.get(name, "<absent>"), b.get(name, "<absent>")))
    return out


def format_differences(diffs, old_label: str = "before", new_label: str = "now") -> str:
    return "\n".join(f"  {name}: {old!r} ({old_label}) -> {new!r} ({new_label})"
                     for name, old, new in diffs)


def dump(cfg: dict) -> str:
    return _yaml().safe_dump(cfg, sort_keys=False)
