"""The throughput measurement runs on the CPU with synthetic images and reports what it says."""
import json

from _harness import RECIPE  # noqa: F401  (the recipe on sys.path)

import throughput
from errors import run_command


def cli(argv):
    return run_command(throughput.main, argv, "throughput.py")


def test_synthetic_throughput_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert cli(["--synthetic", "--device", "cpu", "--steps", "3",
                     "--warmup", "1", "--batch-size", "8", "--image-size", "16",
                     "--set", "model.width=4", "--set", "model.bn_splits=2",
                     "--set", "stage1.queue_size=64", "--set", "threads=1",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images_per_s"] > 0 and 0 <= result["data_wait_fraction"] <= 1
    assert result["steps"] == len(result["per_step"]) == 3 and result["global_batch"] == 8
    assert result["config"]["data"] == "synthetic" and result["config"]["device"] == "cpu"
    assert result["provenance"]["versions"]["torch"] and result["provenance"]["device"]["name"]
    assert "images/s, data wait" in capsys.readouterr().out


def test_compile_switch_compiles_both_encoders(tmp_path, monkeypatch):
    # Inductor's code generation takes about a minute on two CPU cores: the switch is tested
    # with dynamo's eager backend (the graphs are captured, not code-generated).
    import torch
    compiled = []
    original = torch.nn.Module.compile

    def eager_compile(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return original(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    out = tmp_path / "t.json"
    assert cli(["--synthetic", "--device", "cpu", "--steps", "2",
                     "--warmup", "1", "--batch-size", "8", "--image-size", "16", "--compile",
                     "--set", "model.width=4", "--set", "model.bn_splits=2",
                     "--set", "stage1.queue_size=64", "--json", str(out)]) == 0
    assert compiled == ["ContrastiveEncoder", "ContrastiveEncoder"]  # query and key encoders
    assert json.loads(out.read_text())["config"]["compile"] is True
