"""The benchmarks' own logic at their tiniest settings, in this process, where a test needs what ``main`` returns:
seeds and sections of the convergence table, refused arguments, step time and state bytes. Each benchmark started
as a user starts it, and the reports of those runs, are checked in test_benchmark_commands.py."""

import pytest

from benchmarks import convergence, step_time


def test_convergence_quick_seeds_reports_mean_and_spread(tmp_path):
    rows = convergence.main(["--quick", "--seeds", "2", "--optimizers", "galore", "--out-dir", str(tmp_path)])
    report = (tmp_path / "convergence.md").read_text()
    assert "seeds 0, 1 (" in report
    for r in rows:
        lo, hi = min(r["seed_losses"]), max(r["seed_losses"])
        assert len(r["seed_losses"]) == 2 and lo <= r["final_val_loss"] <= hi
        assert f"| {r['final_val_loss']:.4f} ({lo:.4f}-{hi:.4f}) |" in report
    adamw = rows[0]["seed_losses"]
    assert adamw[0] != adamw[1]  # another seed: other weights and batches


def test_convergence_rejects_unknown_optimizer_before_training(tmp_path):
    with pytest.raises(ValueError, match="Invalid --optimizer: 'lion'"):
        convergence.main(["--quick", "--optimizers", "galore", "lion", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "convergence.md").exists()


def test_convergence_section_keeps_the_main_table(tmp_path):
    convergence.main(["--quick", "--optimizers", "galore", "--out-dir", str(tmp_path)])
    main_table = (tmp_path / "convergence.md").read_text()
    for optimizer in ("galore8bit", "dct8bit"):  # the second run replaces the first one's section
        convergence.main(["--quick", "--optimizers", optimizer, "--section", "8-bit states", "--out-dir", str(tmp_path)])
    report = (tmp_path / "convergence.md").read_text()
    assert report.startswith(main_table.rstrip("\n"))
    section = report[len(main_table):]
    assert section.count("<!-- section: 8-bit states -->") == 1 and section.count("## 8-bit states") == 1
    assert "--section '8-bit states'" in section and "| dct8bit |" in section and "| galore8bit |" not in section
    assert (tmp_path / "convergence-8-bit-states.png").read_bytes()[:4] == b"\x89PNG"
    convergence.main(["--quick", "--optimizers", "fira", "--out-dir", str(tmp_path)])  # a new main table
    report = (tmp_path / "convergence.md").read_text()
    assert "| fira |" in report and "| galore |" not in report and "| dct8bit |" in report


def test_convergence_name_at_lr_sets_the_lr_in_its_own_section(tmp_path):
    convergence.main(["--quick", "--optimizers", "galore", "--out-dir", str(tmp_path)])
    main_table = (tmp_path / "convergence.md").read_text()
    rows = convergence.main(["--quick", "--optimizers", "frugal-block@0.003", "frugal-block", "spectral-sst",
                             "--section", "FRUGAL modes", "--out-dir", str(tmp_path)])
    assert [(r["name"], r["lr"]) for r in rows] == [("adamw", 1e-3), ("frugal-block", 3e-3), ("frugal-block", 1e-3),
                                                    ("spectral-sst", 1e-3)]
    report = (tmp_path / "convergence.md").read_text()
    assert report.startswith(main_table.rstrip("\n"))
    section = report[len(main_table):]
    assert "| frugal-block | slimtrain frugal, mode='block' | 0.003 |" in section
    assert "| frugal-block | slimtrain frugal, mode='block' | 0.001 |" in section
    assert "| spectral-sst | slimtrain to_spectral + SpectralSSTAdamW | 0.001 |" in section


@pytest.mark.parametrize("text, expected", [("frugal", ("frugal", None)), ("frugal@0.003", ("frugal", 0.003)),
                                            ("spectral-sst@1e-3", ("spectral-sst", 1e-3)), ("galore-torch@0.01", ("galore-torch", 0.01))])
def test_convergence_parses_name_at_lr(text, expected):
    assert convergence.parse_optimizer(text) == expected


@pytest.mark.parametrize("text, message", [
    ("frugal@", r"Invalid --optimizers: 'frugal@' \(expected NAME or NAME@LR with LR a number > 0"),
    ("frugal@fast", r"Invalid --optimizers: 'frugal@fast'"),
    ("frugal@-0.1", r"Invalid --optimizers: 'frugal@-0.1'"),
    ("frugal@0", r"Invalid --optimizers: 'frugal@0'"),
    ("frugal@nan", r"Invalid --optimizers: 'frugal@nan'"),
    ("frugal@1@2", r"Invalid --optimizers: 'frugal@1@2'"),
    ("lion@0.1", r"Invalid --optimizer: 'lion'"),
    ("@0.1", r"Invalid --optimizer: ''"),
])
def test_convergence_refuses_bad_optimizers_before_training(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        convergence.main(["--quick", "--optimizers", "galore", text, "--out-dir", str(tmp_path)])
    assert not (tmp_path / "convergence.md").exists()


def test_step_time_quick(tmp_path):
    names = ["adamw", "galore-torch", "galore", "dct8bit"]
    rows = step_time.main(["--quick", "--optimizers", *names, "--out-dir", str(tmp_path)])
    assert [r["name"] for r in rows] == names
    report = (tmp_path / "step_time.md").read_text()
    assert "python -m benchmarks.step_time --quick" in report and "cores, torch" in report
    assert sum(line.startswith("|") for line in report.splitlines()) == 2 + len(names)
    by_name = {r["name"]: r for r in rows}
    assert by_name["adamw"]["refresh"] is None and all(by_name[n]["refresh"] > 0 for n in names[1:])
    # Same shapes, same rank: slimtrain's GaLore state is galore-torch's plus a few counters.
    assert 0 <= by_name["galore"]["state"] - by_name["galore-torch"]["state"] < 4096
    assert by_name["dct8bit"]["state"] < by_name["galore"]["state"] < by_name["adamw"]["state"]
