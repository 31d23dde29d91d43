"""slimtrain optimizers under DeepSpeed ZeRO stages 1, 2 and 3.

Under ZeRO the client optimizer never sees a matrix: each rank steps one flat fp32 partition per param
group (stages 1/2) or per sub-group (stage 3), cut at arbitrary element offsets, often mid-row. A
low-rank step needs whole matrices (an SVD, a DCT, a per-row norm), so :class:`ZeroLowRankOptimizer`
splits the work:

- **element-wise parts** (plain AdamW groups, and vectors inside projected groups) step locally on the
  rank's own slice: no communication, state split exactly as ZeRO splits Adam's;
- **each projected matrix has one owner rank**, chosen once by balancing matrix sizes. Every step, the
  ranks holding pieces of the owner's matrices send those gradient pieces to it (one ``gather``
  per owner), the owner reassembles the matrices and runs the optimizer's own single-process update
  (``LowRankAdamW.matrix_update``: projection, refresh, Adam, residual rule), and sends each rank
  the update for its pieces (one ``scatter``); each rank applies it, with weight decay, to its slice::

        rank 0 slice | rank 1 slice          owner (say rank 1) of W (m x n)
      [ W[0:k]     ] [ W[k:mn]     ]   --gather G pieces-->  G = [G0 | G1] -> update U (m x n)
      [ U[0:k]     ] [ U[k:mn]     ]  <--scatter U pieces--  low-rank state of W lives here only

  The arithmetic is the single-process arithmetic on the same full matrix, so the result equals a
  one-process run to fp32 rounding; the low-rank state (moments, basis, counters) lives on the owner
  alone, so it is split across ranks by matrix; refreshes happen at the owner with no communication.

Cost: per step, each projected matrix's gradient and update cross the network once each
(``2 (N-1)/N`` of the projected parameters in floats), on top of ZeRO's own reduce-scatter and
all-gather. The owner holds full gradients of the matrices it owns during its step: about ``1/N`` of the
projected parameters, ZeRO-2's gradient partition size. ``benchmarks/zero.py`` measures both.

Where the pieces sit is read from DeepSpeed internals, all in :mod:`._deepspeed` (a supported version range,
checked when the wrapper is built). The optimizer is driven through its public entry points for sharded
steps (``step_dense_shard_``, ``matrix_update``, ``apply_update_``).

Non-finite gradients: each ``step()`` call agrees across ranks (an all-reduced flag) and skips its
partition whole. DeepSpeed steps one group at a time, so for a whole-step skip across groups enable
``gradient_clipping`` in the DeepSpeed config: DeepSpeed then skips every group on a non-finite norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..optimizers.base import LowRankAdamW
from ..optimizers.functional import closure_loss
from . import _deepspeed

FORMAT = "slimtrain-zero-v1"


@dataclass(frozen=True)
class Fragment:
    """This rank's piece of one original parameter inside a flat partition."""

    group: int  # param group index
    index: int  # parameter index within its group
    start: int  # offset of the piece in the flattened parameter
    numel: int
    offset: int  # offset of the piece in the flat partition this rank steps


class CommCounter:
    """Bytes this rank sent through the collectives this module issues."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.calls = 0

    def add(self, tensor: Tensor) -> None:
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.calls += 1


class ZeroLowRankOptimizer(torch.optim.Optimizer):
    """Wraps a slimtrain optimizer so DeepSpeed ZeRO can step it; see the module docstring.

    Build it through :func:`slimtrain.sharding.initialize`, which also attaches it to the engine.
    """

    def __init__(self, inner: LowRankAdamW):
        if not isinstance(inner, LowRankAdamW):
            raise TypeError(f"Invalid optimizer: {type(inner).__name__} (expected a slimtrain optimizer)")
        _deepspeed.check_deepspeed_version()
        self.inner = inner
        self._params = [list(g["params"]) for g in inner.param_groups]
        self._shapes = [[tuple(p.shape) for p in ps] for ps in self._params]
        # DeepSpeed swaps `param_groups` for a one-group list while it steps a group: keep our own view.
        self._projected = ["rank" in g for g in inner.param_groups]
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])} for g in inner.param_groups]
        super().__init__(groups, dict(inner.defaults))
        self._units: dict[int, tuple[str, int, list[Fragment]]] = {}
        self._owner: dict[tuple[int, int], int] = {}
        self._pieces: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.skipped_steps = 0
        self.comm = CommCounter()
        self.stage = None
        self.world_size = 1
        self.rank = 0

    # ------------------------------------------------------------------------------------------
    # Layout
    def _is_matrix(self, g: int, i: int) -> bool:
        return self._projected[g] and len(self._shapes[g][i]) >= 2

    def _locate(self, p: Tensor) -> tuple[int, int]:
        for g, ps in enumerate(self._params):
            for i, q in enumerate(ps):
                if q is p:
                    return g, i
        raise RuntimeError("DeepSpeed partitioned a parameter the slimtrain optimizer does not hold")

    def attach(self, zero_optimizer, stage: int) -> None:
        """Read where each parameter's piece sits in this rank's flat partitions (once, after
        ``deepspeed.initialize``), and agree with the other ranks on matrix owners."""
        self.stage = stage
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        units: list[tuple[str, int, Tensor, list[Fragment], set]] = []
        if stage in (1, 2):
            for g, group in enumerate(self.param_groups):
                flat = group["params"][0]
                frags = []
                for i, p in enumerate(self._params[g]):
                    piece = _deepspeed.stage12_fragment(p)
                    if piece is not None:
                        frags.append(Fragment(g, i, *piece))
                units.append((f"g{g}", g, flat, frags, {(g, i) for i in range(len(self._params[g]))}))
        else:
            for sg, (g, flat, params) in enumerate(_deepspeed.stage3_subgroups(zero_optimizer)):
                offset, frags, members = 0, [], set()
                for p in params:
                    _, i = self._locate(p)
                    members.add((g, i))
                    part = _deepspeed.stage3_partition_numel(p)
                    start = self.rank * part
                    numel = max(0, min(part, math.prod(self._shapes[g][i]) - start))
                    if numel:
                        frags.append(Fragment(g, i, start, numel, offset))
                    offset += part
                units.append((f"s{sg}", g, flat, frags, members))
        self._units = {id(flat): (key, g, frags) for key, g, flat, frags, _ in units}
        self._members = {key: members for key, _, _, _, members in units}
        self._flats = {key: flat for key, _, flat, _, _ in units}

        mine = [(f.group, f.index, f.start, f.numel) for _, _, _, frags, _ in units for f in frags if self._is_matrix(f.group, f.index)]
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        self._pieces = {}
        for r, pieces in enumerate(everyone):
            for g, i, start, numel in pieces:
                self._pieces.setdefault((g, i), [(0, 0)] * self.world_size)[r] = (start, numel)
        load = [0] * self.world_size
        for key in sorted(self._pieces, key=lambda k: (-math.prod(self._shapes[k[0]][k[1]]), k)):
            owner = min(range(self.world_size), key=lambda r: (load[r], r))
            self._owner[key] = owner
            load[owner] += math.prod(self._shapes[key[0]][key[1]])

    # ------------------------------------------------------------------------------------------
    # The step
    @torch.no_grad()
    def step(self, closure=None):
        if not self._units:
            raise RuntimeError(
                "ZeroLowRankOptimizer is not attached to a DeepSpeed engine: build it with slimtrain.sharding.initialize"
            )
        loss = closure_loss(closure)
        for group in self.param_groups:
            for flat in group["params"]:
                self._step_flat(flat, group)
        return loss

    def _step_flat(self, flat: Tensor, group: dict) -> None:
        key, g, frags = self._units[id(flat)]
        grad = flat.grad
        if grad is None:
            grad = torch.zeros_like(flat)
        # Collective buffers live on the partition's device: NCCL takes CUDA tensors only.
        ok = torch.isfinite(grad.sum()).float().reshape(1)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        self.comm.add(ok)
        if ok.item() == 0.0:
            self.skipped_steps += 1
            return
        state = self.state[flat]
        if "rank" not in group:
            self.inner.step_dense_shard_(flat, grad, group, state.setdefault("dense", {}))
            return
        for f in frags:
            if not self._is_matrix(f.group, f.index):
                sl = slice(f.offset, f.offset + f.numel)
                self.inner.step_dense_shard_(flat[sl], grad[sl], group, state.setdefault(f"p{f.index}", {}))
        # Every rank walks the same matrices in the same order (the unit's members), including ranks
        # that hold no piece of some of them: gather and scatter are collective.
        matrices = sorted(k for k in self._members[key] if k in self._pieces)
        for owner in range(self.world_size):
            owned = [k for k in matrices if self._owner[k] == owner]
            if owned:
                self._owner_step(owner, owned, flat, grad, group, state, frags)

    def _owner_step(self, owner, owned, flat, grad, group, state, frags) -> None:
        local = {(f.group, f.index): f for f in frags}
        sizes = [sum(self._pieces[k][r][1] for k in owned) for r in range(self.world_size)]
        width = max(sizes)
        device = flat.device
        send = torch.zeros(width, dtype=torch.float32, device=device)
        pos = 0
        for k in owned:
            f = local.get(k)
            if f is not None:
                send[pos : pos + f.numel] = grad[f.offset : f.offset + f.numel]
                pos += f.numel
        self.comm.add(send)
        inbox = [torch.empty(width, device=device) for _ in range(self.world_size)] if self.rank == owner else None
        dist.gather(send, inbox, dst=owner)

        outbox = None
        if self.rank == owner:
            outbox = [torch.zeros(width, device=device) for _ in range(self.world_size)]
            cursor = [0] * self.world_size
            updates = {}
            for k in owned:
                shape = self._shapes[k[0]][k[1]]
                full = torch.zeros(math.prod(shape), device=device)
                for r, (start, numel) in enumerate(self._pieces[k]):
                    full[start : start + numel] = inbox[r][cursor[r] : cursor[r] + numel]
                    cursor[r] += numel
                rows = shape[0]
                matrix = full.view(rows, -1)
                p = self._params[k[0]][k[1]]
                mstate = state.setdefault(f"p{k[1]}", {})
                updates[k] = self.inner.matrix_update(p, matrix, group, mstate).reshape(-1)
            cursor = [0] * self.world_size
            for k in owned:
                for r, (start, numel) in enumerate(self._pieces[k]):
                    outbox[r][cursor[r] : cursor[r] + numel] = updates[k][start : start + numel]
                    cursor[r] += numel
            for r in range(self.world_size):
                if r != owner:
                    self.comm.add(outbox[r])
        recv = torch.empty(width, device=device)
        dist.scatter(recv, outbox, src=owner)
        pos = 0
        for k in owned:
            f = local.get(k)
            if f is not None:
                sl = slice(f.offset, f.offset + f.numel)
                self.inner.apply_update_(flat[sl], group, recv[pos : pos + f.numel])
                pos += f.numel

    # ------------------------------------------------------------------------------------------
    # Checkpoints (DeepSpeed's rigid checkpoints save and restore exactly this, per rank)
    def state_dict(self) -> dict:
        by_key = {}
        for key, flat in self._flats.items():
            if flat in self.state:
                by_key[key] = self.state[flat]
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {
            "format": FORMAT,
            "world_size": self.world_size,
            "rank": self.rank,
            "stage": self.stage,
            "state": by_key,
            "param_groups": hyper,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("format") != FORMAT:
            raise RuntimeError("Not a slimtrain ZeRO optimizer checkpoint (saved by another optimizer or an elastic checkpoint)")
        if state_dict["world_size"] != self.world_size or state_dict["stage"] != self.stage:
            raise RuntimeError(
                f"This checkpoint was saved with {state_dict['world_size']} ranks at ZeRO stage {state_dict['stage']}; "
                f"it can only be resumed with the same ({self.world_size} ranks at stage {self.stage} now). The low-rank "
                "state is split by matrix owner and by ZeRO's partition offsets, which both change with the world size."
            )
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for k, v in saved.items():
                group[k] = v
        self.state.clear()
        for key, st in state_dict["state"].items():
            flat = self._flats[key]
            g = self._units[id(flat)][1]
            self.state[flat] = {name: self._placed(g, name, sub, flat.device) for name, sub in st.items()}
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def _placed(self, g: int, name: str, sub: dict, device: torch.device) -> dict:
        """A loaded piece of state (``"dense"``, or ``"p<i>"`` for parameter ``i`` of group ``g``) on the devices
        the optimizer's state declaration names: its counters on the host, everything else beside this rank's
        partition, whatever device the checkpoint was read onto."""
        i = 0 if name == "dense" else int(name[1:])
        shape = self._shapes[g][i]  # from before partitioning: ZeRO-3 parameters hold no data here
        host = self.inner.state_host_keys(torch.empty(shape, device="meta"), self.inner.param_groups[g])
        return {k: (v.to("cpu" if k in host else device, copy=True) if isinstance(v, Tensor) else v) for k, v in sub.items()}

    def state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank."""
        total = 0

        def walk(obj):
            nonlocal total
            if isinstance(obj, Tensor):
                total += obj.numel() * obj.element_size()
            elif isinstance(obj, dict):
                for v in obj.values():
                    walk(v)

        walk(dict(self.state))
        return total
