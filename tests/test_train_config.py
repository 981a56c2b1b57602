"""Config loading (references/kcl/config.py, one dataclass per section): every value coerced and
checked against its field's type at load time, with an error naming the key, the value and the
expected type; `base:` inheritance; differences; which keys the user set."""
import pytest

import _harness  # noqa: F401  (the recipe on sys.path)

from config import KEYS, NEUTRAL_KEYS, Config, differences, flatten, load_config
from errors import ConfigError


def test_a_string_where_a_float_is_due_is_an_error_naming_key_value_and_type():
    with pytest.raises(ConfigError, match=r"config key 'stage2.lr': expected a number >= 0.0, "
                                          r"got 'fast' \(str\)"):
        load_config(overrides=["stage2.lr=fast"])
    with pytest.raises(ConfigError, match=r"'eval.sigma': expected a number >= 1e-12, got "
                                          r"'five' \(str\)"):
        load_config(overrides=["eval.sigma=five"])


def test_yaml_strings_that_are_numbers_become_floats_before_training(tmp_path):
    # YAML 1.1 reads 3e1 and 5e-2 (no dot) as strings: they are numbers here, at load time.
    cfg = load_config(overrides=["stage2.lr=3e1", "eval.sigma=5e-2", "stage1.epochs=3.0"])
    assert cfg.stage2.lr == 30.0 and isinstance(cfg.stage2.lr, float)
    assert cfg.eval.sigma == 0.05
    assert cfg.stage1.epochs == 3 and isinstance(cfg.stage1.epochs, int)
    path = tmp_path / "c.yaml"
    path.write_text("stage1:\n  weight_decay: 5e-4\n  lr: 1e-1\ndata:\n  crop_scale: [8e-2, 1]\n")
    cfg = load_config(str(path))
    assert cfg.stage1.weight_decay == 5e-4 and cfg.stage1.lr == 0.1
    assert cfg.data.crop_scale == [0.08, 1.0]


@pytest.mark.parametrize("override, message", [
    ("stage1.epochs=2.5", r"'stage1.epochs': expected an integer >= 0, got 2.5 \(float\)"),
    ("stage1.epochs=-1", r"'stage1.epochs': expected an integer >= 0, got -1"),
    ("stage2.class_balanced=1", r"'stage2.class_balanced': expected a boolean .*, got 1 \(int\)"),
    ("stage1.k=true", r"'stage1.k': expected an integer >= 1, got True \(bool\)"),
    ("amp=true", r"'amp': expected one of 'bf16', 'fp16', 'off', got True"),
    ("data.crop_scale=[0.5]", r"'data.crop_scale': expected a list of 2 numbers"),
    ("stage2.milestones=[60, x]", r"'stage2.milestones\[1\]': expected an integer"),
    ("stage1.lr=null", r"'stage1.lr': expected a number >= 0.0, got None"),
    ("model.momentum=1.5", r"'model.momentum': expected a number in \[0.0, 1.0\], got 1.5"),
    ("stage1.lr=.nan", r"'stage1.lr': expected a number"),
    ("stage1=3", r"config key 'stage1' must be a mapping"),
    ("stage1.kk=3", r"unknown config key 'stage1.kk'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_checks_across_keys():
    with pytest.raises(ConfigError, match="eval.few_threshold"):
        load_config(overrides=["eval.few_threshold=200"])
    with pytest.raises(ConfigError, match="data.train_list is required"):
        load_config(overrides=["data.kind=split_list", "data.image_root=/x"])
    with pytest.raises(ConfigError, match="data.mean and data.std"):
        load_config(overrides=["data.mean=[0.5]"])
    with pytest.raises(ConfigError, match="milestones must be increasing"):
        load_config(overrides=["stage2.milestones=[80, 60]"])


def test_base_inheritance_and_file_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("stage1:\n  epochs: 7\n  lr: 0.5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nstage1:\n  lr: 0.25\n")
    cfg = load_config(str(tmp_path / "b.yaml"))
    assert (cfg.stage1.epochs, cfg.stage1.lr) == (7, 0.25)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(str(tmp_path / "loop.yaml"))
    with pytest.raises(FileNotFoundError, match="config file .*nothere.yaml not found"):
        load_config(str(tmp_path / "nothere.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(tmp_path / "list.yaml"))


def test_defaults_follow_the_schema_and_differences():
    flat = flatten(Config())
    assert {"data.num_workers", "progress", "log_interval", "eval.every_epochs"} <= NEUTRAL_KEYS
    assert "stage2.lr" not in NEUTRAL_KEYS and set(NEUTRAL_KEYS) <= set(flat)
    assert "threads" not in NEUTRAL_KEYS  # CPU sums depend on it
    assert flat["amp"] == "bf16" and KEYS["stage1.lr"].kind == "float"
    new = load_config(overrides=["stage2.lr=10", "data.num_workers=4"])
    assert differences(Config(), new) == [("data.num_workers", 0, 4), ("stage2.lr", 30.0, 10.0)]
    assert differences(Config(), new, keys=("stage2",)) == [("stage2.lr", 30.0, 10.0)]


@pytest.mark.parametrize("overrides, message", [
    (["data.class_order=[0, 1, 2, 3, 4, 5, 6, 7, 8, 8]"],
     r"data.class_order must be a permutation of the 10 classes 0..9 .*missing \[9\]; "
     r"repeated \[8\]"),
    (["data.class_order=[0, 1, 2]"], r"permutation of the 10 classes .*missing \[3, 4, 5"),
    (["data.class_order=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"], r"outside \[0, 10\): \[10\]"),
    (["data.class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]", "data.class_counts=[5, 5, 5, 5, 5, 5, "
      "5, 5, 5, 5]"], "data.class_order and data.class_counts exclude each other"),
    (["data.class_counts=[5, 5]"], r"data.class_counts must list 10 sizes"),
    (["data.kind=synthetic", "data.num_classes=3", "data.class_order=[0, 1, 2]"],
     r"data.class_order applies to data.kind fashion_mnist_lt, not 'synthetic'"),
    (["data.balanced_list=val.txt"],
     r"data.balanced_list applies to data.kind split_list, not 'fashion_mnist_lt'"),
])
def test_impossible_class_orders_and_balanced_splits_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_a_class_order_assigns_the_profile_by_rank():
    from data import counts_by_class
    cfg = load_config(overrides=["data.max_per_class=1000",
                                 "data.class_order=[6, 0, 2, 4, 3, 1, 9, 5, 7, 8]"])
    counts = counts_by_class(10, 1000, 100.0, cfg.data.class_order)
    # profile 1000, 599, 359, 215, 129, 77, 46, 27, 16, 10 by rank; class 6 first, 8 last
    assert counts == [599, 77, 359, 129, 215, 27, 1000, 16, 10, 46]


def test_the_config_is_typed_and_knows_which_keys_the_user_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  shuffle_bn: true\nstage1:\n  lr: 0.5\n")
    cfg = load_config(str(path), ["seed=4"])
    assert isinstance(cfg, Config) and cfg.stage1.lr == 0.5 and cfg.seed == 4
    assert cfg.user_keys == {"model.shuffle_bn", "stage1.lr", "seed"}
    assert load_config().user_keys == frozenset()
    assert cfg.to_dict()["model"]["shuffle_bn"] is True and "user_keys" not in cfg.to_dict()
