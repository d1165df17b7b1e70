"""The parity gate decides what ships: its verdict, and classify/serve/chat/load refusing what it did not pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import PHRASES

import slmkit
from slmkit import cli, gate


def _workspace(root: Path, model_src: Path) -> Path:
    """A pipeline workspace's int4 output: artifacts/quantize/{lineage.json, model/} (the model a real folder)."""
    quantize = root / "artifacts" / "quantize"
    shutil.copytree(model_src, quantize / "model")
    record = {"stage": "quantize", "config_sections": ["builder"], "config_sha256": "0" * 64, "packages": {}}
    (quantize / "lineage.json").write_text(json.dumps(record))
    return quantize / "model"


def _judge(model: Path, int4: float, merged: float, tolerance: float = 0.02) -> dict:
    """What the evaluate stage writes: the verdict on `model` into artifacts/evaluate/gate.json."""
    record = {
        **gate.verdict("int4_onnx", int4, "merged_pytorch", merged, tolerance),
        "model_sha256": gate.fingerprint(model),
    }
    out = model.parent.parent / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    (out / gate.GATE_FILE).write_text(json.dumps(record))
    return record


@pytest.fixture
def model(tmp_path: Path, tiny_model_dirs) -> Path:
    return _workspace(tmp_path, tiny_model_dirs["onnx"])


def test_verdicts_by_gap_and_tolerance():
    assert gate.verdict("int4_onnx", 0.86, "merged_pytorch", 0.87, 0.02)["verdict"] == gate.PASSED
    assert gate.verdict("int4_onnx", 0.85, "merged_pytorch", 0.87, 0.02)["verdict"] == gate.PASSED  # edge
    assert gate.verdict("int4_onnx", 0.84, "merged_pytorch", 0.87, 0.02)["verdict"] == gate.REFUSED
    # Within a tolerance past the bound: not judged for shipping.
    assert gate.verdict("int4_onnx", 0.50, "merged_pytorch", 0.87, 0.5)["verdict"] == gate.LOOSE
    assert gate.verdict("int4_onnx", 0.87, "merged_pytorch", 0.87, gate.MAX_TOLERANCE)["verdict"] == gate.PASSED


def test_a_passed_verdict_on_this_exact_model_lets_it_load(model: Path):
    record = _judge(model, 0.86, 0.87)
    assert gate.check(model) == record
    assert slmkit.load(model).classify(PHRASES[:2])[0].label is not None


@pytest.mark.parametrize(
    ("int4", "merged", "tolerance", "says"),
    [(0.80, 0.87, 0.02, "the parity gate refused it"), (0.60, 0.87, 0.5, "its gate was loosened")],
)
def test_a_model_the_gate_did_not_pass_is_refused_saying_why(model: Path, int4, merged, tolerance, says):
    _judge(model, int4, merged, tolerance)
    with pytest.raises(gate.NotShipped, match=says) as err:
        slmkit.load(model)
    assert f"{int4:.4f}" in str(err.value) and "--ungated" in str(err.value)
    assert slmkit.load(model, ungated=True).classify(PHRASES[:1])[0].label is not None


def test_an_unjudged_model_is_refused(model: Path):
    with pytest.raises(gate.NotShipped, match="has not been through the parity gate"):
        gate.check(model)


def test_a_verdict_on_another_build_does_not_carry_over(model: Path):
    _judge(model, 0.86, 0.87)
    config = model / "genai_config.json"
    config.write_text(config.read_text() + "\n")  # a rebuilt model: other bytes
    with pytest.raises(gate.NotShipped, match="not the model the parity gate judged"):
        gate.check(model)


def test_folders_the_pipeline_did_not_build_need_no_verdict(tiny_model_dirs):
    assert gate.check(tiny_model_dirs["onnx"]) is None
    assert slmkit.load(tiny_model_dirs["onnx"]).classify(PHRASES[:1])[0].label is not None


def test_cli_refuses_a_refused_model_in_one_line_and_takes_it_with_ungated(model: Path, capsys):
    _judge(model, 0.80, 0.87)
    assert cli.main(["classify", "--model", str(model), "Hi!"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("slmkit classify: error:") and "refused" in err and "\n" not in err
    assert cli.main(["classify", "--model", str(model), "--ungated", "Hi!"]) == 0
    assert capsys.readouterr().out.strip().endswith("\tHi!")
    assert cli.main(["gate", str(model)]) == 1
    assert "not shippable" in capsys.readouterr().err


def test_cli_gate_and_lineage_report_a_passed_verdict(model: Path, capsys, monkeypatch):
    _judge(model, 0.86, 0.87)
    assert cli.main(["gate", str(model)]) == 0
    assert "parity gate passed: int4_onnx 0.8600 vs merged_pytorch 0.8700" in capsys.readouterr().out
    monkeypatch.chdir(model.parent.parent.parent)
    assert cli.main(["lineage", "artifacts/quantize/model"]) == 0
    assert "gate      passed" in capsys.readouterr().out
