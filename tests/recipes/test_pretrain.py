import csv
import json
import math
import os
import re

import pytest
import torch

from slimtrain.cli import main as cli_main
from slimtrain.optimizers import SpectralLinear, SpectralSSTAdamW
from slimtrain.recipes import pretrain
from slimtrain.recipes.optim import VARIANT_NAMES

# A few steps of the tiny model on 2 x 32-byte sequences of a small corpus (conftest.py): about a second per run.
TINY = ["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]


def _run(out, corpus, *extra):
    return pretrain.main([*TINY, "--data", *corpus, "--out", str(out), *extra])


def _rows(out):
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_cli_tiny_run_writes_csv_png_checkpoint(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    cli_main(["pretrain", *TINY, "--data", *corpus, "--optimizer", "galore", "--rank", "8",
              "--steps", "4", "--eval-every", "2", "--out", str(out)])
    assert "final val loss" in capsys.readouterr().out
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True]
    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and set(ckpt) >= {"model", "optimizer", "scheduler", "rng"}
    assert json.loads((out / "config.json").read_text())["rank"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["optimizer_state_bytes"] > 0


def _available_low_rank():
    from slimtrain.optimizers import OPTIMIZERS

    return [n for n in ("galore", "fira", "frugal", "dct", "sst") if n in OPTIMIZERS]


# spectral-sst at rank 96 of the tiny model's 192: a round is ceil(192 / 96) = 2 resamples, so with a gap
# of 1 the layers are re-SVD'd every 2 steps, on both sides of the stop.
@pytest.mark.parametrize("optimizer, rank, gap", [
    ("adamw", None, None), *[(n, "8", "2") for n in _available_low_rank()],
    ("frugal-block", "8", "2"), ("spectral-sst", "8", "2"), ("spectral-sst", "96", "1"),
])
def test_resume_is_bit_exact(tmp_path, corpus, optimizer, rank, gap):
    # update-proj-gap 2 puts subspace refreshes (and FRUGAL's resets, or its block window moving)
    # on both sides of the stop.
    args = ["--optimizer", optimizer, "--steps", "6", "--eval-every", "2"]
    if optimizer != "adamw":
        args += ["--rank", rank, "--update-proj-gap", gap]
    _run(tmp_path / "straight", corpus, *args)
    _run(tmp_path / "stopped", corpus, *args, "--stop-at", "3")
    assert int(_rows(tmp_path / "stopped")[-1]["step"]) == 3
    _run(tmp_path / "stopped", corpus, *args, "--resume")

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)
    keys = ("step", "train_loss", "val_loss", "lr")
    assert [[r[k] for k in keys] for r in _rows(tmp_path / "straight")] == [
        [r[k] for k in keys] for r in _rows(tmp_path / "stopped")
    ]


@pytest.mark.parametrize("optimizer", VARIANT_NAMES)
def test_variants_train_and_count_their_state(tmp_path, corpus, optimizer):
    summary = _run(tmp_path / "run", corpus, "--optimizer", optimizer, "--rank", "8", "--steps", "2", "--eval-every", "2")
    assert math.isfinite(summary["final_val_loss"])
    cfg = pretrain.validate(pretrain.parse_args([*TINY, "--data", *corpus, "--out", str(tmp_path / "x"),
                                                 "--optimizer", optimizer, "--rank", "8"]))
    model, optimizer_ = pretrain.build_model_and_optimizer(cfg)
    if optimizer == "spectral-sst":
        assert isinstance(optimizer_, SpectralSSTAdamW)
        assert sum(isinstance(m, SpectralLinear) for m in model.modules()) == 7 * 4  # q k v o gate up down, 4 layers
        state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
        held = sum(v.numel() * v.element_size() for st in state.values() for v in st.values() if torch.is_tensor(v))
        assert summary["optimizer_state_bytes"] == held > 0  # SpectralSSTAdamW.state_bytes(), every tensor it holds
    else:
        assert (optimizer_.mode, optimizer_.defaults["density"], optimizer_.rule.block_order) == ("block", 0.25, "descending")
        assert optimizer_.defaults["lr"] == 1e-3 and optimizer_.rule.capabilities.layerwise is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer", "spectral-sst", "--scale", "0.5"],
         r"Invalid --scale: 0.5 with --optimizer spectral-sst \(SpectralSSTAdamW has no update scale\)"),
        (["--optimizer", "spectral-sst", "--rank", "500"], r"Invalid --rank: 500 \(expected 1 <= rank <= 192"),
        (["--optimizer", "adam"], r"Invalid --optimizer: 'adam' \(expected one of adamw, galore, .*fira.*frugal.*dct.*sst"),
        (["--rank", "500"], r"Invalid --rank: 500 \(expected 1 <= rank <= 192"),
        (["--rank", "0"], r"Invalid --rank: 0"),
        (["--model", "7b"], r"Invalid --model: '7b' \(expected one of tiny, small, 60m"),
        (["--data", "/nonexistent/play.txt"], r"Invalid --data: file\(s\) not found: /nonexistent/play.txt"),
        (["--steps", "0"], r"Invalid --steps: 0"),
        (["--steps", "5", "--stop-at", "6"], r"Invalid --stop-at: 6"),
        (["--lr", "-1"], r"Invalid --lr: -1.0"),
        (["--resume"], r"Invalid --resume: no checkpoint"),
        (["--optimizer", "galore", "--density", "0.5"], r"Invalid --density: 0.5 \(.*with --optimizer frugal or frugal8bit or frugal-block or frugal-block8bit only\)"),
        (["--optimizer", "adamw", "--rank", "8"], r"Invalid --rank/--update-proj-gap/--scale with --optimizer adamw"),
        (["--resume", "--overwrite"], r"Invalid --resume with --overwrite"),
        (["--device", "tpu"], r"Invalid --device: 'tpu' \(expected auto .*cpu, cuda or cuda:N\)"),
        (["--device", "cuda:x"], r"Invalid --device: 'cuda:x'"),
        (["--dtype", "fp16"], r"Invalid --dtype: 'fp16' \(expected one of fp32, bf16, bf16-autocast\)"),
        pytest.param(["--device", "cuda"], r"Invalid --device: 'cuda' \(no CUDA device available: .*use --device cpu\)",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
        pytest.param(["--device", "cuda:64"], r"Invalid --device: 'cuda:64' \(this machine has \d+ CUDA device",
                     marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
    ],
)
def test_bad_arguments_fail_with_one_line_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--no-progress", "--out", str(out), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_out_is_not_overwritten_silently(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    _run(out, corpus, "--optimizer", "adamw", "--steps", "2", "--eval-every", "2")
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(SystemExit):
        _run(out, corpus, "--optimizer", "adamw", "--steps", "3", "--eval-every", "3")
    assert "is not empty (pass --resume to continue it or --overwrite to replace it)" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    _run(out, corpus, "--optimizer", "adamw", "--steps", "3", "--eval-every", "3", "--overwrite")
    assert [int(r["step"]) for r in _rows(out)] == [1, 2, 3]


def test_resume_with_different_arguments_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    _run(out, corpus, "--optimizer", "adamw", "--steps", "4", "--eval-every", "2", "--stop-at", "2")
    with pytest.raises(SystemExit):
        _run(out, corpus, "--optimizer", "adamw", "--steps", "4", "--eval-every", "2", "--lr", "0.1", "--resume")
    assert "Invalid --resume: arguments differ from the run" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    factors = [pretrain.lr_factor(s, warmup=10, total=100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert pretrain.lr_factor(100, warmup=10, total=100) == pytest.approx(0.1)


# --- device, precision, activation checkpointing -------------------------------------------------------------


def _one_step_loss_and_grads(extra: list[str]):
    cfg = pretrain.parse_args(["--out", "-", "--optimizer", "adamw", *extra])
    cfg.device = "cpu"
    model, _ = pretrain.build_model_and_optimizer(cfg)
    model.train()
    mlp_calls, mlp = [], model.model.layers[0].mlp
    act = mlp.act_fn  # counted in forward, not by a hook: torch runs no module hooks in a recompute

    class Counted(torch.nn.Module):
        def forward(self, h):
            mlp_calls.append(1)
            return act(h)

    mlp.act_fn = Counted()
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    with pretrain.runtime.autocast("cpu", cfg.dtype):
        loss = pretrain.next_byte_loss(model, x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(mlp_calls)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16-autocast"])
def test_activation_checkpointing_recomputes_and_gives_the_same_gradients(dtype):
    loss, grads, calls = _one_step_loss_and_grads(["--dtype", dtype])
    loss_ac, grads_ac, calls_ac = _one_step_loss_and_grads(["--dtype", dtype, "--activation-checkpointing"])
    assert (calls, calls_ac) == (1, 2)  # the block's forward runs again in the backward pass
    # The recomputation runs the same CPU kernels on the same inputs: measured bit for bit in all three modes.
    assert torch.equal(loss, loss_ac)
    for name in grads:
        assert torch.equal(grads[name], grads_ac[name]), name


def test_bf16_keeps_bf16_weights_and_fp32_optimizer_state(tmp_path, corpus):
    out = tmp_path / "run"
    summary = _run(out, corpus, "--steps", "2", "--eval-every", "2", "--rank", "8", "--dtype", "bf16")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {v.dtype for v in ckpt["model"].values()} == {torch.bfloat16}
    moments = [v for st in ckpt["optimizer"]["state"].values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    assert math.isfinite(summary["final_val_loss"]) and summary["final_val_loss"] < 5.6  # ln 256 = 5.55 at init
    saved = json.loads((out / "summary.json").read_text())
    assert saved["device"] == "cpu" and saved["dtype"] == "bf16"
    assert saved["peak_memory_source"] == "cpu_peak_rss" and saved["peak_memory_bytes"] > 2**20
    assert saved["tokens_per_s"] > 0
    assert json.loads((out / "config.json").read_text())["device"] == "cpu"  # auto, resolved and recorded


def test_bf16_autocast_keeps_fp32_weights(tmp_path, corpus):
    out = tmp_path / "run"
    _run(out, corpus, "--optimizer", "adamw", "--steps", "2", "--eval-every", "2", "--dtype", "bf16-autocast")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {v.dtype for v in ckpt["model"].values()} == {torch.float32}
    fp32 = _run(tmp_path / "fp32", corpus, "--optimizer", "adamw", "--steps", "2", "--eval-every", "2")
    rows, rows32 = _rows(out), _rows(tmp_path / "fp32")
    # bf16 matmuls: the first loss (same weights, same batch) within bf16's relative precision of fp32's.
    assert float(rows[0]["train_loss"]) == pytest.approx(float(rows32[0]["train_loss"]), rel=2**-7)
    assert rows[0]["train_loss"] != rows32[0]["train_loss"]  # autocast did run in bf16
    assert fp32["dtype"] == "fp32"


@pytest.mark.parametrize("extra", [["--dtype", "bf16"], ["--dtype", "bf16-autocast"], ["--activation-checkpointing"]],
                         ids=["bf16", "bf16-autocast", "checkpointing"])
def test_resume_is_bit_exact_with_device_and_precision_options(tmp_path, corpus, extra):
    args = ["--steps", "4", "--eval-every", "2", "--rank", "8", "--update-proj-gap", "2", "--device", "cpu", *extra]
    _run(tmp_path / "straight", corpus, *args)
    _run(tmp_path / "stopped", corpus, *args, "--stop-at", "2")
    _run(tmp_path / "stopped", corpus, *args, "--resume")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    keys = ("step", "train_loss", "val_loss")
    assert [[r[k] for k in keys] for r in _rows(tmp_path / "straight")] == [
        [r[k] for k in keys] for r in _rows(tmp_path / "stopped")
    ]


def test_resume_with_another_dtype_or_device_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["--optimizer", "adamw", "--steps", "4", "--eval-every", "2"]
    _run(out, corpus, *args, "--stop-at", "2", "--dtype", "bf16")
    with pytest.raises(SystemExit) as e:
        _run(out, corpus, *args, "--resume")
    assert e.value.code == 2
    assert "Invalid --resume: arguments differ from the run in" in (err := capsys.readouterr().err)
    assert "--dtype 'fp32' (was 'bf16')" in err
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "device": "cuda"}))
    with pytest.raises(SystemExit):
        _run(out, corpus, *args, "--dtype", "bf16", "--resume")
    assert "--device 'cpu' (was 'cuda')" in capsys.readouterr().err


def test_a_run_recorded_without_the_device_options_resumes_as_cpu_fp32(tmp_path, corpus):
    out = tmp_path / "run"
    args = ["--optimizer", "adamw", "--steps", "4", "--eval-every", "2"]
    _run(out, corpus, *args, "--stop-at", "2")
    config = json.loads((out / "config.json").read_text())
    for key in ("device", "dtype", "activation_checkpointing"):
        del config[key]
    (out / "config.json").write_text(json.dumps(config))
    assert _run(out, corpus, *args, "--resume")["steps"] == 4
    with pytest.raises(SystemExit):
        _run(out, corpus, *args, "--dtype", "bf16", "--resume")


def test_model_1b_is_the_galore_paper_shape():
    from slimtrain.recipes.models import model_config

    c = model_config("1b", 256)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == (2048, 5461, 24, 32)


def test_device_kinds_a_resume_may_change_between():
    same = pretrain.runtime.same_device_kind
    assert same("cuda:0", "cuda:1") and same("cuda", "cuda:0") and same("cpu", "cpu")
    assert not same("cpu", "cuda") and not same("auto", "cpu") and same("auto", "auto")


def test_the_command_imports_only_the_subcommand_given(monkeypatch, capsys):
    """`slimtrain pretrain` does not import the finetune recipe (and with it PEFT), nor any other."""
    import importlib

    from slimtrain import cli

    imported, import_module = [], importlib.import_module
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: imported.append(name) or import_module(name))
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--help"])
    assert e.value.code == 0 and "--allow-data-change" in capsys.readouterr().out
    assert set(imported) == {"slimtrain.recipes.pretrain"}
