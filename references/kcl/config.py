"""The run configuration: one dataclass per section, YAML files (with `base:`) and `--set`.

    cfg = load_config("configs/fmnist_lt_kcl.yaml", ["stage1.epochs=3"])
    cfg.stage1.lr, cfg.data.kind, cfg.eval.sigma

Every field declares its type (the annotation), default and limits (`key(...)`). Loading checks
and converts every value before anything trains: a typo in a key, a string where a number is due
(YAML 1.1 reads `5e-4` as a string: it is converted here) or a value out of range is a
ConfigError that names the key, the value and what was expected. docs/training.md describes each
key. To add a key, add a field; to add a section, add a dataclass and a field of `Config`.

Keys marked `neutral` cannot change what a run computes (loader workers, logging, progress
display): `--resume` accepts a change of them; a change of any other key is refused.
`cfg.user_keys` holds the dotted keys the user gave (in files, `base` or `--set`), so that notes
about a setting go only to a user who set it.

A config file is looked for as given, then relative to this folder (`configs/X.yaml` works from
anywhere).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field

from errors import ConfigError, MissingFileError

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Key:
    """The limits of one config value; its kind comes from the field's annotation."""

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


def key(default, *, choices=(), minimum=None, maximum=None, length=None, neutral=False):
    """A dataclass field with the limits of its value (checked by `load_config`)."""
    limits = {"choices": tuple(choices), "minimum": minimum, "maximum": maximum,
              "length": length, "neutral": neutral}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=limits)
    return field(default=default, metadata=limits)


AMP_MODES = ("bf16", "fp16", "off")
PROGRESS_MODES = ("auto", "bar", "line", "none")
LOSSES = ("kcl", "fcl", "moco", "ce")
DATA_KINDS = ("fashion_mnist_lt", "split_list", "synthetic")
PUBLISHED_DATASETS = ("imagenet_lt", "inat2018", "places_lt")


@dataclass
class DataConfig:
    kind: str = key("fashion_mnist_lt", choices=DATA_KINDS)
    dataset: str | None = key(None, choices=PUBLISHED_DATASETS)
    root: str | None = key(None)
    imbalance_factor: float = key(100.0, minimum=1.0)
    max_per_class: int = key(6000, minimum=1)
    test_per_class: int | None = key(None, minimum=1)
    subset_seed: int = key(0, minimum=0)
    class_order: list[int] | None = key(None)
    class_counts: list[int] | None = key(None, minimum=1)
    balanced_per_class: int | None = key(None, minimum=1)
    balanced_list: str | None = key(None)
    image_root: str | None = key(None)
    train_list: str | None = key(None)
    val_list: str | None = key(None)
    test_list: str | None = key(None)
    num_classes: int | None = key(None, minimum=1)
    synthetic_images: int = key(4096, minimum=1)
    synthetic_source_size: int | None = key(None, minimum=1)
    synthetic_channels: int = key(3, minimum=1)
    check_files: bool = key(True, neutral=True)
    image_size: int = key(28, minimum=1)
    crop_scale: list[float] = key([0.08, 1.0], length=2, minimum=0.0, maximum=1.0)
    mean: list[float] | None = key(None)
    std: list[float] | None = key(None, minimum=1e-12)
    num_workers: int = key(0, minimum=0, neutral=True)
    pin_memory: bool = key(True, neutral=True)
    prefetch_factor: int = key(4, minimum=1, neutral=True)


@dataclass
class ModelConfig:
    arch: str = key("small_resnet")
    width: int = key(16, minimum=1)
    blocks: int = key(1, minimum=1)
    stem_stride: int = key(1, minimum=1)
    norm: str = key("bn", choices=("bn", "gn", "none"))
    bn_splits: int = key(1, minimum=1)
    dim: int = key(128, minimum=1)
    mlp_head: bool = key(False)
    momentum: float = key(0.999, minimum=0.0, maximum=1.0)
    shuffle_bn: bool = key(True)


@dataclass
class Stage1Config:
    loss: str = key("kcl", choices=LOSSES)
    k: int = key(6, minimum=1)
    temperature: float = key(0.07, minimum=1e-6)
    queue_size: int = key(65536, minimum=1)
    backend: str = key("auto", choices=("auto", "cpu", "cuda", "triton", "reference"))
    epochs: int = key(200, minimum=0)
    batch_size: int = key(256, minimum=1)
    lr: float = key(0.1, minimum=0.0)
    momentum: float = key(0.9, minimum=0.0, maximum=1.0)
    weight_decay: float = key(5e-4, minimum=0.0)
    schedule: str = key("cosine", choices=("cosine", "step"))
    milestones: list[int] = key([], minimum=0)
    gamma: float = key(0.1, minimum=0.0)
    checkpoint: str | None = key(None)


@dataclass
class Stage2Config:
    epochs: int = key(100, minimum=0)
    batch_size: int = key(256, minimum=1)
    lr: float = key(30.0, minimum=0.0)
    momentum: float = key(0.9, minimum=0.0, maximum=1.0)
    weight_decay: float = key(0.0, minimum=0.0)
    schedule: str = key("step", choices=("cosine", "step"))
    milestones: list[int] = key([60, 80], minimum=0)
    gamma: float = key(0.1, minimum=0.0)
    init_std: float = key(0.01, minimum=0.0)
    class_balanced: bool = key(False)
    samples_per_class: int = key(4, minimum=1)
    augment: bool = key(True)


@dataclass
class EvalConfig:
    many_threshold: int = key(100, minimum=0)
    few_threshold: int = key(20, minimum=0)
    sigma: float = key(0.1, minimum=1e-12)
    batch_size: int = key(256, minimum=1, neutral=True)
    every_epochs: int = key(0, minimum=0, neutral=True)
    save_features: bool = key(False, neutral=True)
    plot: bool = key(True, neutral=True)


@dataclass
class Config:
    seed: int = key(0, minimum=0)
    device: str = key("auto", choices=("auto", "cpu", "cuda"))
    # GPU speed options (no effect on the CPU).
    amp: str = key("bf16", choices=AMP_MODES)
    channels_last: bool = key(True)
    cudnn_benchmark: bool = key(True)
    compile: bool = key(False)
    # Not neutral: the CPU kernels' sums depend on the number of threads (1 and 2 threads give
    # different weights after two epochs of the Fashion-MNIST config).
    threads: int | None = key(None, minimum=1)
    log_interval: int = key(10, minimum=1, neutral=True)
    checkpoint_every_steps: int = key(0, minimum=0, neutral=True)
    progress: str = key("auto", choices=PROGRESS_MODES, neutral=True)
    tensorboard: bool = key(True, neutral=True)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        self.user_keys: frozenset = frozenset()  # not a field: not in to_dict() or checkpoints

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _spec(f: dataclasses.Field) -> Key:
    kind = f.type.replace(" | None", "")
    return Key(kind, nullable="None" in f.type, **f.metadata)


def _is_section(f: dataclasses.Field) -> bool:
    return dataclasses.is_dataclass(f.default_factory) if f.default_factory is not \
        dataclasses.MISSING else False


def _leaves(cls=Config, prefix: str = ""):
    for f in dataclasses.fields(cls):
        if _is_section(f):
            yield from _leaves(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", _spec(f)


KEYS = dict(_leaves())
NEUTRAL_KEYS = frozenset(name for name, spec in KEYS.items() if spec.neutral)


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
        item = Key(spec.kind[5:-1], minimum=spec.minimum, maximum=spec.maximum)
        return [_number(f"{name}[{i}]", v, item, item.kind) for i, v in enumerate(value)]
    raise AssertionError(spec.kind)


def _merge(target, update: dict, where: str, given: set) -> None:
    """Checks and writes the values of the mapping `update` into the dataclass `target`."""
    fields = {f.name: f for f in dataclasses.fields(target)}
    for name, value in update.items():
        dotted = f"{where}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key {dotted!r} (known keys here: "
                              f"{', '.join(sorted(fields))})")
        f = fields[name]
        if _is_section(f):
            if not isinstance(value, dict):
                known = ", ".join(sorted(x.name for x in dataclasses.fields(f.default_factory)))
                raise ConfigError(f"config key {dotted!r} must be a mapping of {known}, "
                                  f"got {value!r}")
            _merge(getattr(target, name), value, dotted + ".", given)
        else:
            setattr(target, name, coerce(dotted, value, _spec(f)))
            given.add(dotted)


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


def find_config(path: str) -> str:
    """`path` as given, else relative to this folder or its configs/; the error says where it
    looked."""
    tried = [os.path.abspath(path)]
    if not os.path.isabs(path):
        tried.append(os.path.join(HERE, path))
        tried.append(os.path.join(HERE, "configs", path))
    for candidate in tried:
        if os.path.isfile(candidate):
            return candidate
    raise MissingFileError(f"config file {path} not found (looked for {' and '.join(tried)})")


def load_config(path: str | None = None, overrides=(), base: dict | None = None) -> Config:
    """The defaults, then `base` (a mapping), then the YAML file, then each `--set` override;
    every value checked against its field, then the whole checked by `validate`."""
    cfg, given = Config(), set()
    if base:
        _merge(cfg, copy.deepcopy(base), "", given)
    if path:
        _merge(cfg, read_yaml(find_config(path)), "", given)
    for text in overrides:
        _merge(cfg, parse_override(text), "", given)
    validate(cfg)
    cfg.user_keys = frozenset(given)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that involve several keys (each key's own type and range are checked on load)."""
    s1, s2, d, e = cfg.stage1, cfg.stage2, cfg.data, cfg.eval
    if e.few_threshold > e.many_threshold + 1:
        raise ConfigError(f"eval.few_threshold ({e.few_threshold}) must be <= "
                          f"eval.many_threshold + 1 ({e.many_threshold + 1})")
    if d.crop_scale[0] > d.crop_scale[1]:
        raise ConfigError(f"data.crop_scale must be [low, high] with low <= high, got "
                          f"{d.crop_scale}")
    if (d.mean is None) != (d.std is None) or \
            (d.mean is not None and len(d.mean) != len(d.std)):
        raise ConfigError(f"data.mean and data.std must both be null or lists of the same "
                          f"length, got {d.mean} and {d.std}")
    if d.kind == "split_list":
        for key in ("image_root", "train_list", "test_list"):
            if not getattr(d, key):
                raise ConfigError(f"data.{key} is required for data.kind split_list")
    if d.kind == "synthetic" and not d.num_classes:
        raise ConfigError("data.num_classes is required for data.kind synthetic")
    for key, kind in (("class_order", "fashion_mnist_lt"), ("class_counts", "fashion_mnist_lt"),
                      ("balanced_per_class", "fashion_mnist_lt"), ("balanced_list", "split_list")):
        if getattr(d, key) is not None and d.kind != kind:
            raise ConfigError(f"data.{key} applies to data.kind {kind}, not {d.kind!r}")
    if d.class_order is not None and d.class_counts is not None:
        raise ConfigError("data.class_order and data.class_counts exclude each other: "
                          "class_counts gives every class its size directly")
    if d.kind == "fashion_mnist_lt":
        from data import check_class_order, counts_by_class
        from errors import DataError
        try:
            if d.class_order is not None:
                check_class_order(d.class_order, 10)
            counts_by_class(10, d.max_per_class, d.imbalance_factor, d.class_order,
                            d.class_counts)
        except DataError as err:
            raise ConfigError(str(err)) from err
    for name, stage in (("stage1", s1), ("stage2", s2)):
        if sorted(stage.milestones) != stage.milestones:
            raise ConfigError(f"{name}.milestones must be increasing, got {stage.milestones}")


# ----------------------------------------------------------------------------------------------
# Comparing configs (resume, stage 2 from a stage-1 checkpoint)
# ----------------------------------------------------------------------------------------------
def flatten(cfg, prefix: str = "") -> dict:
    """{dotted key: value} of a Config or of its mapping form."""
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(old, new, keys=None) -> list[tuple[str, object, object]]:
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


def dump(cfg: Config) -> str:
    return _yaml().safe_dump(cfg.to_dict(), sort_keys=False)
