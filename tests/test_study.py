"""The paired study (experiments/fmnist_lt_study/study.py): orderings, the checks of a study
file, the analysis on hand-made cells, and a tiny study end to end on generated images whose numbers
do not depend on the number of worker processes."""
import json

import pytest
import yaml

from _harness import make_fashion_idx, tiny_config

import study
from errors import ConfigError, DataError, OutputError


def test_interleaved_orderings_hand_computed():
    ranking = [6, 4, 2, 0, 3, 5, 7, 9, 8, 1]      # hardest ... easiest
    # S = 6 1 4 8 2 9 0 7 3 5 (hardest, easiest, 2nd hardest, 2nd easiest, ...); ordering j
    # puts S[2j], S[2j+1] on the Few ranks 8, 9 and the rest of S, cyclically, before them.
    orderings = study.interleaved_orderings(ranking, [8, 9], 4)
    assert orderings == [[4, 8, 2, 9, 0, 7, 3, 5, 6, 1],
                         [2, 9, 0, 7, 3, 5, 6, 1, 4, 8],
                         [0, 7, 3, 5, 6, 1, 4, 8, 2, 9],
                         [3, 5, 6, 1, 4, 8, 2, 9, 0, 7]]
    few = [order[8:] for order in orderings]
    assert few == [[6, 1], [4, 8], [2, 9], [0, 7]]  # (j-th hardest, j-th easiest)
    for order in orderings:
        assert sorted(order) == list(range(10))
    hard = study.hard_classes([0.5, 0.9, 0.7, 0.95, 0.6, 0.9, 0.4, 0.97, 0.93, 0.99])
    assert hard == [0, 2, 4, 6]                      # below the mean, 0.781
    study.check_coverage(orderings, [8, 9], hard, ranking)
    with pytest.raises(DataError, match=r"classes \[0\] are hard .* never Few in 3 orderings; "
                                        r"the study needs orderings: 4 or more"):
        study.check_coverage(orderings[:3], [8, 9], hard, ranking)
    # 3 Few ranks of 10 classes: S[9] = ranking[5] is never Few.
    with pytest.raises(DataError, match="no number of orderings with 3 Few ranks reaches"):
        study.check_coverage(study.interleaved_orderings(ranking, [7, 8, 9], 3), [7, 8, 9],
                             [ranking[5], 1], ranking)
    assert study.few_ranks([1000, 599, 27, 16, 10], 20) == [3, 4]


def test_interleaved_orderings_odd_classes():
    # 5 classes, ranking 0..4: S = 0 4 1 3 2; one Few rank (4): ordering j ends with S[j].
    assert study.interleaved_orderings([0, 1, 2, 3, 4], [4], 3) == [
        [4, 1, 3, 2, 0], [1, 3, 2, 0, 4], [3, 2, 0, 4, 1]]


def test_impossible_orderings_are_refused():
    ranking = list(range(10))
    with pytest.raises(DataError, match="6 orderings requested; with 10 classes and 2 Few ranks "
                                        "there are 1..5"):
        study.interleaved_orderings(ranking, [8, 9], 6)
    with pytest.raises(DataError, match="no Few class"):
        study.interleaved_orderings(ranking, [], 1)
    with pytest.raises(DataError, match="must name every class once"):
        study.interleaved_orderings([0, 1, 1, 3], [3], 1)


def write_study(tmp_path, fm_root, **changes):
    methods = {}
    for name, loss in (("CE", "ce"), ("FCL", "fcl"), ("KCL", "kcl")):
        cfg = tiny_config(fm_root, stage1={"loss": loss, "epochs": 2},
                          stage2={"epochs": 4, "milestones": [3]})
        cfg["data"].update(max_per_class=20, imbalance_factor=10)
        cfg["eval"].update(many_threshold=10, few_threshold=6)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        methods[name] = f"{name}.yaml"
    # Sizes 20, 15, 11, 9, 7 | 5, 4, 3, 2, 2: five Few ranks, so two orderings make every
    # class Few once (whatever the control learns in one epoch).
    spec = {"methods": methods, "control": "CE", "control_seeds": [0], "orderings": 2,
            "seeds": [0], "balanced_per_class": 8, "jobs": 1, "confidence": 0.95,
            "claims": [{"a": "KCL", "b": "CE", "beta": "higher", "few": "higher"},
                       {"a": "FCL", "b": "CE", "beta": None, "few": "higher"}]}
    spec.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory):
    return make_fashion_idx(str(tmp_path_factory.mktemp("fm")))


def test_bad_study_files_get_clear_errors(fm_root, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown study keys \['epochs'\]"):
        study.load_study(write_study(tmp_path, fm_root, epochs=3))
    with pytest.raises(ConfigError, match="a claim is .* got \\{'a': 'KCL', 'b': 'SCL'"):
        study.load_study(write_study(tmp_path, fm_root, claims=[{"a": "KCL", "b": "SCL"}]))
    with pytest.raises(ConfigError, match="give 1 pair\\(s\\); a t-interval needs at least 2"):
        study.load_study(write_study(tmp_path, fm_root, orderings=1, seeds=[3]))
    with pytest.raises(ConfigError, match="`control` must be one of the methods"):
        study.load_study(write_study(tmp_path, fm_root, control="SL"))
    path = write_study(tmp_path, fm_root)
    kcl = yaml.safe_load((tmp_path / "KCL.yaml").read_text())
    kcl["stage2"]["lr"] = 0.1
    (tmp_path / "KCL.yaml").write_text(yaml.safe_dump(kcl))
    with pytest.raises(ConfigError, match=r"differ only in stage1.loss and stage1.k .*\n"
                                          r"  stage2.lr: 0.5 \(CE\) -> 0.1 \(KCL\)"):
        study.load_study(path)


def cell(beta, few, few_ib=None, std=10.0, worst=50.0, rel=80.0):
    return {"beta": beta, "few": few, "few_ib": few if few_ib is None else few_ib,
            "class_std": std, "worst": worst, "few_relative": rel, "many": 90.0,
            "medium": 70.0, "all": 80.0}


def test_analysis_hand_computed():
    cells = {"CE": [cell(0.70, 60.0, few_ib=20.0), cell(0.72, 62.0, few_ib=30.0),
                    cell(0.71, 58.0, few_ib=20.0), cell(0.69, 64.0, few_ib=22.0)],
             "KCL": [cell(0.71, 61.0), cell(0.74, 65.0), cell(0.72, 59.0), cell(0.71, 67.0)]}
    claims = [{"a": "KCL", "b": "CE", "beta": "higher", "few": "lower"}]
    out = study.analyse(cells, claims, "CE")
    rows = {r["metric"]: r for r in out["rows"]}
    # beta: d = 0.01, 0.02, 0.01, 0.02: mean 0.015, sample sd sqrt(4 * 0.005^2 / 3),
    # half width 3.1824463 * 0.0057735 / 2 = 0.0091869: [0.0058, 0.0242] -> supported
    assert rows["beta"]["mean"] == pytest.approx(0.015)
    assert rows["beta"]["half_width"] == pytest.approx(0.0091869, abs=1e-6)
    assert rows["beta"]["verdict"] == "supported" and rows["beta"]["positive"] == 4
    # few: d = 1, 3, 1, 3 with the prediction "lower": above 0 -> contradicted
    assert rows["few"]["verdict"] == "contradicted" and rows["few"]["predicted"] == "lower"
    # the companions: class_std falls when beta rises; identical cells: d = 0 -> undecided
    assert rows["class_std"]["predicted"] == "lower" and rows["worst"]["predicted"] == "higher"
    assert rows["class_std"]["verdict"] == "undecided" and rows["class_std"]["zero"] == 4
    assert rows["few_relative"]["predicted"] == "lower"
    # positive control: CE's class-balanced minus instance-balanced Few: 40, 32, 38, 42
    pc = out["positive_control"]
    assert pc["mean"] == pytest.approx(38.0) and pc["sensitive"] is True
    assert out["summary"]["KCL"]["few"]["mean"] == pytest.approx(63.0)
    # A control that cannot see the rebalancing: not sensitive, and the table says so.
    flat = {m: [dict(c, few_ib=c["few"] + s) for c, s in zip(cs, (1, -1, 2, -2))]
            for m, cs in cells.items()}
    out = study.analyse(flat, claims, "CE")
    assert out["positive_control"]["sensitive"] is False


def test_a_tiny_study_end_to_end_does_not_depend_on_the_workers(fm_root, tmp_path, capsys):
    path = write_study(tmp_path, fm_root)
    out1, out2 = tmp_path / "one", tmp_path / "two"
    assert study.main(["--config", path, "--out", str(out1), "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| KCL − CE | β (balanced-split classifier) | A > B |" in printed
    assert "Positive control (CE features, Few)" in printed
    assert "- KCL higher than CE in β: " in printed
    assert "- FCL − CE in β (no predicted direction): " in printed
    assert study.main(["--config", path, "--out", str(out2), "--jobs", "2"]) == 0
    first = json.loads((out1 / "study.json").read_text())
    second = json.loads((out2 / "study.json").read_text())
    assert first["digest"] == second["digest"]
    for key in ("design", "cells", "analysis"):  # the digest covers these, with paths
        strip = json.dumps(first[key]).replace(str(out1), "X")
        assert strip == json.dumps(second[key]).replace(str(out2), "X")
    design = first["design"]
    assert len(design["orderings"]) == 2 and len(first["cells"]["KCL"]) == 2
    # sizes 20, 15, 11, 9, 7, 5, 4, 3, 2, 2 (78 images): the balanced control has 8 or 7
    assert design["balanced_control_counts"] == [8] * 8 + [7] * 2
    assert design["few_ranks"] == [5, 6, 7, 8, 9]
    for order in design["orderings"]:
        assert sorted(order) == list(range(10))
    few = {order[r] for order in design["orderings"] for r in design["few_ranks"]}
    assert few == set(range(10))  # every class is Few once
    for name in ("verdict.md", "differences.png", "cells.png"):
        assert (out1 / name).stat().st_size > 0
    with pytest.raises(OutputError, match="not empty"):
        study.main(["--config", path, "--out", str(out1)])


def test_a_study_where_the_load_average_is_unobtainable_still_writes_its_result(
        fm_root, tmp_path, monkeypatch):
    """os.getloadavg raises OSError where the load average is unobtainable: the study's timing
    then records no load instead of failing after every cell has trained."""
    def unobtainable():
        raise OSError("load average unobtainable")

    monkeypatch.setattr(study.os, "getloadavg", unobtainable)
    out = tmp_path / "out"
    assert study.main(["--config", write_study(tmp_path, fm_root), "--out", str(out),
                       "--jobs", "1"]) == 0
    result = json.loads((out / "study.json").read_text())
    timing = result["timing"]
    assert (timing["load_average_1min_start"], timing["load_average_1min_max"],
            timing["load_average_1min_mean"]) == (None, None, None)
    assert result["provenance"]["load_average_1min"] is None
    assert len(result["cells"]["KCL"]) == 2
