"""slimtrain optimizers inside transformers' Trainer: the factory, the callback, and DeepSpeed ZeRO-2."""

from __future__ import annotations

import os
import socket

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.trainer_optimizer import is_optimizer_factory  # noqa: E402

from slimtrain.integrations import SlimtrainCallback, optimizer_factory, unwrap_optimizer  # noqa: E402
from slimtrain.integrations.trainer import TrainerZeroOptimizer  # noqa: E402
from slimtrain.optimizers import FiraAdamW, GaLoreAdamW  # noqa: E402

CALLBACK_KEYS = ("optim_state_MiB", "proj_refreshes", "skipped_steps")


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 8), generator=g)
        self.labels = self.ids[:, 0] % 3  # learnable: the first token decides

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def training_args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8, logging_steps=2,
                    save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(**{**defaults, **kw})


def test_instance_and_callback_keys_in_log_history(tmp_path):
    model = tiny_model()
    opt = GaLoreAdamW([{"params": [p for n, p in model.named_parameters() if "encoder" not in n or p.dim() < 2]},
                       {"params": [p for n, p in model.named_parameters() if "encoder" in n and p.dim() == 2],
                        "rank": 4, "update_proj_gap": 3}], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=Rows(),
                                   optimizers=(opt, sched), callbacks=[SlimtrainCallback()])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "optim_state_MiB" in h]
    assert len(logged) >= 3
    assert all(set(CALLBACK_KEYS) <= set(h) for h in logged)
    assert logged[-1]["optim_state_MiB"] == pytest.approx(opt.state_bytes() / 2**20, abs=1e-4)
    assert logged[-1]["optim_state_MiB"] > 0
    # 12 encoder matrices, refreshed at steps 0 and 3 (update_proj_gap=3) within 6 steps
    assert logged[-1]["proj_refreshes"] == 12 * 2
    assert logged[-1]["skipped_steps"] == 0
    assert unwrap_optimizer(trainer.optimizer) is opt


def test_factory_builds_projected_groups(tmp_path):
    model = tiny_model()
    factory = optimizer_factory("galore", ["attention", "intermediate", "output.dense"], rank=4, update_proj_gap=2,
                                scale=0.5)
    assert is_optimizer_factory(factory)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=Rows(),
                                   optimizer_cls_and_kwargs=(factory, {"lr": 5e-3, "weight_decay": 0.01}),
                                   callbacks=[SlimtrainCallback()])
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert type(opt) is GaLoreAdamW
    plain, projected = opt.param_groups
    assert "rank" not in plain
    assert {k: projected[k] for k in ("rank", "update_proj_gap", "scale", "proj_type")} == dict(
        rank=4, update_proj_gap=2, scale=0.5, proj_type="std")
    assert opt.defaults["lr"] == 5e-3  # the tuple's kwargs reach the optimizer
    assert projected["weight_decay"] == 0.01
    names = {id(p): n for n, p in model.named_parameters()}
    proj_names = sorted(names[id(p)] for p in projected["params"])
    assert len(proj_names) == 12 and all(n.endswith(".weight") and "encoder" in n for n in proj_names)
    assert not any("classifier" in names[id(p)] for p in projected["params"])
    for p in projected["params"]:
        state = opt.state[p]
        assert int(state["proj_refreshes"]) == 3  # steps 0, 2, 4 of 6
        low = [v for v in state.values() if torch.is_tensor(v) and v.dim() == 2 and v.shape != p.shape]
        assert low, "a projected matrix got no low-rank state"
    assert any("proj_refreshes" in h for h in trainer.state.log_history)


def test_factory_kwargs_override_and_class(tmp_path):
    factory = optimizer_factory(FiraAdamW, "all-linear", rank=8)
    opt = factory()(tiny_model(), rank=2, lr=1e-3)
    assert type(opt) is FiraAdamW
    assert opt.param_groups[-1]["rank"] == 2 and opt.param_groups[-1]["lr"] == 1e-3
    assert is_optimizer_factory(factory)


@pytest.mark.parametrize(
    "args, match",
    [
        (("adam",), r"Invalid optimizer: 'adam' \(expected one of galore"),
        ((torch.optim.AdamW,), r"Invalid optimizer: .*AdamW.* \(expected one of"),
        (("galore", [1, 2]), r"Invalid target_modules: \[1, 2\]"),
    ],
)
def test_factory_bad_args(args, match):
    with pytest.raises(ValueError, match=match):
        optimizer_factory(*args)


def test_factory_targets_matching_nothing():
    with pytest.raises(ValueError, match=r"Invalid target_modules: \['nope'\] matches no linear layer"):
        optimizer_factory("galore", ["nope"], rank=2)()(tiny_model())


def test_factory_targets_that_are_frozen_say_so():
    """low_rank_param_groups over frozen targets: they matched, so say that they are frozen and what to do."""
    model = tiny_model()
    model.bert.encoder.requires_grad_(False)
    with pytest.raises(ValueError, match=r"Invalid target_modules: \['attention'\] matches 8 linear layers, all frozen "
                                         r"\(requires_grad=False: bert\.encoder\.layer\.0\.attention\.self\.query, .*"
                                         r"unfreeze them \(module\.requires_grad_\(True\)\)"):
        optimizer_factory("galore", ["attention"], rank=2)()(model)


def test_callback_ignores_other_optimizers(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=Rows(),
                                   optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
                                   callbacks=[SlimtrainCallback()])
    trainer.train()
    assert not any("optim_state_MiB" in h for h in trainer.state.log_history)


def test_factory_under_deepspeed_config_without_launching(monkeypatch):
    """What the factory returns for each DeepSpeed config the Trainer would hold (no engine is built)."""
    import slimtrain.integrations.trainer as T

    factory = optimizer_factory("galore", ["attention"], rank=2)
    monkeypatch.setattr(T, "_deepspeed_config", lambda: {"zero_optimization": {"stage": 0}})
    assert type(factory()(tiny_model())) is GaLoreAdamW
    monkeypatch.setattr(T, "_deepspeed_config", lambda: {"zero_optimization": {"stage": 2}})
    wrapped = factory()(tiny_model())
    assert isinstance(wrapped, TrainerZeroOptimizer) and wrapped.zero_stage == 2 and type(wrapped.inner) is GaLoreAdamW
    monkeypatch.setattr(T, "_deepspeed_config", lambda: {"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}})
    with pytest.raises(ValueError, match="has an 'optimizer' section"):
        factory()(tiny_model())
    model = tiny_model()
    for p in model.parameters():
        p.ds_id = 0  # what deepspeed.zero.Init leaves on a partitioned parameter
    monkeypatch.setattr(T, "_deepspeed_config", lambda: {"zero_optimization": {"stage": 3}})
    with pytest.raises(RuntimeError, match="already partitioned by deepspeed.zero.Init"):
        factory()(model)


def test_unattached_zero_wrapper_says_what_to_do():
    inner = GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "rank": 2}])
    with pytest.raises(RuntimeError, match="SlimtrainCallback"):
        TrainerZeroOptimizer(inner, 2).step()


# ---------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2 and ZeRO-3 through the Trainer, 2 gloo ranks on CPU (one launch for both stages): 6 steps
# with a checkpoint at step 3, then a second Trainer resumed from it (trainer.train(resume_from_checkpoint=...))
STAGES = (2, 3)
SAVE_AT = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zero_trainer(out_dir, stage: int):
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "steps_per_print": 10_000,
          "zero_optimization": {"stage": stage, "reduce_bucket_size": 64, "stage3_param_persistence_threshold": 0}}
    model = tiny_model()  # before the TrainingArguments: no zero.Init partitioning at construction
    args = training_args(out_dir, deepspeed=ds, ddp_backend="gloo", logging_steps=1, save_strategy="steps",
                         save_steps=SAVE_AT)
    factory = optimizer_factory("galore", ["attention", "intermediate", "output.dense"], rank=4, update_proj_gap=2)
    return transformers.Trainer(model=model, args=args, train_dataset=Rows(),
                                optimizer_cls_and_kwargs=(factory, {"lr": 1e-2}), callbacks=[SlimtrainCallback()])


def _zero_run(trainer, **train_kw):
    from deepspeed.utils import safe_get_full_fp32_param

    trainer.train(**train_kw)
    weights = [safe_get_full_fp32_param(p).detach().clone() for p in trainer.model_wrapped.module.parameters()]
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return weights, losses


def _zero_rank(rank: int, world: int, port: int, out_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1", ACCELERATE_USE_DEEPSPEED="true")
    try:
        import deepspeed.ops as dops

        # The shared-memory comm op serves inference all-reduce only; building it costs ~100 s of g++.
        dops.__compatible_ops__["deepspeed_shm_comm"] = False
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        import pathlib

        for stage in STAGES:
            out = pathlib.Path(out_dir) / f"z{stage}"
            trainer = _zero_trainer(out, stage)
            before = [p.detach().clone() for p in tiny_model().parameters()]
            weights, losses = _zero_run(trainer)
            ours = unwrap_optimizer(trainer.optimizer)
            changed = sum(not torch.equal(a, b) for a, b in zip(weights, before))
            keys = [sorted(set(CALLBACK_KEYS) & set(h)) for h in trainer.state.log_history]
            resumed_weights, resumed_losses = _zero_run(
                _zero_trainer(out, stage), resume_from_checkpoint=str(out / "out" / f"checkpoint-{SAVE_AT}"))
            resume = {"same_weights": all(torch.equal(a, b) for a, b in zip(resumed_weights, weights)),
                      "losses": losses, "resumed_losses": resumed_losses}
            queue.put((rank, stage, type(ours).__name__, ours.stage, changed, len(before), keys, resume, None))
    except BaseException:
        import traceback

        queue.put((rank, None, None, None, None, None, None, None, traceback.format_exc()))


def test_deepspeed_zero_two_ranks_trains_and_resumes_exactly(tmp_path):
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_zero_rank, args=(r, 2, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs) * len(STAGES):
        results.append(queue.get(timeout=300))
        assert results[-1][-1] is None, f"rank {results[-1][0]} failed:\n{results[-1][-1]}"
    for p in procs:
        p.join(timeout=60)
    assert sorted((r[0], r[1]) for r in results) == [(r, s) for r in range(2) for s in STAGES]
    for rank, stage, cls, attached_stage, changed, total, keys, resume, err in results:
        assert cls == "TrainerZeroOptimizer" and attached_stage == stage
        assert changed == total  # every parameter moved (the projected matrices included)
        assert any(k == sorted(CALLBACK_KEYS) for k in keys)
        # resumed at step 3 of 6 (its log history holds steps 1-3 from the checkpoint): the same losses at steps
        # 4-6 and the same weights, bit for bit (one machine)
        assert sorted(resume["losses"]) == list(range(1, 7)) and resume["resumed_losses"] == resume["losses"], resume
        assert resume["same_weights"], f"ZeRO-{stage} rank {rank}: resumed weights differ from the uninterrupted run"
