"""benchmarks.convergence_gpu end to end at its --quick setting on the CPU: the file it writes, its
corpus split, and the data every optimizer sees."""

import pytest

from benchmarks import convergence_gpu


@pytest.fixture(scope="module")
def bench():
    return convergence_gpu


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence_gpu") / "convergence_gpu.md"
    # Two small packages keep the corpus scan short; both are installed wherever the dev extras are.
    result = bench.main(["--quick", "--device", "cpu", "--out", str(out), "--corpus-packages", "numpy", "torch"])
    return result, out.read_text()


def test_writes_header_and_every_row(bench, quick):
    result, report = quick
    assert report.startswith("# Convergence on a GPU")
    assert "python -m benchmarks.convergence_gpu --quick --device cpu" in report
    assert "torch " in report and "| numpy |" in report and "| torch |" in report and "nats per byte" in report
    assert "Partial" not in report
    rows = result["rows"]
    assert [r["label"] for r in rows] == ["adamw@0.001", *bench.RUNS]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    table = [line for line in report.splitlines() if line.startswith("| ") and "`" in line]
    assert len(table) == len(rows)
    assert "## Targets" in report and report.count("**PASS**") + report.count("**FAIL**") == 3


def test_split_is_by_file(quick):
    corpus = quick[0]["corpus"]
    assert corpus.train_files and corpus.val_files
    assert not set(corpus.train_files) & set(corpus.val_files)


def test_data_never_repeats_within_a_run(quick):
    result = quick[0]
    batches, steps = result["batches"], 4
    starts = sorted(s for t in range(steps) for s in batches.starts(t))
    assert len(starts) == steps * batches.batch_size
    # Input windows [s, s + seq_len) are disjoint and lie inside the stream (targets need one byte more).
    assert all(b - a >= batches.seq_len for a, b in zip(starts, starts[1:]))
    assert starts[-1] + batches.seq_len + 1 <= len(batches.tokens)


def test_same_data_order_for_every_optimizer(quick):
    hashes = {r["data_sha1"] for r in quick[0]["rows"]}
    assert len(hashes) == 1


def test_refuses_a_corpus_too_small(bench, tmp_path):
    with pytest.raises(ValueError, match="Corpus too small"):
        bench.main(["--steps", "100000", "--device", "cpu", "--out", str(tmp_path / "c.md"), "--corpus-packages", "numpy"])
    assert not (tmp_path / "c.md").exists()


def test_cpu_run_needs_out(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--device", "cpu"])


def test_time_budget_skips_runs_and_says_so(bench, tmp_path):
    out = tmp_path / "c.md"
    result = bench.main(["--quick", "--device", "cpu", "--out", str(out), "--corpus-packages", "numpy",
                         "--optimizers", "galore", "--time-budget", "0"])
    assert [r["status"].split(":")[0] for r in result["rows"]] == ["skipped", "skipped"]
    report = out.read_text()
    assert "Not run, for the time budget: adamw@0.001, galore." in report and "**NOT MEASURED**" in report
