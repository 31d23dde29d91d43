"""When refreshes happen: every update_proj_gap steps, staggered across matrices on request."""


from slimtrain.optimizers import GaLoreAdamW

from .helpers import groups, mlp, train


def _refresh_steps(stagger: bool) -> dict[int, list[int]]:
    model = mlp()
    opt = GaLoreAdamW(groups(model, gap=6), lr=1e-2, stagger=stagger)
    matrices = [model[0].weight, model[2].weight, model[4].weight]
    seen = {i: [] for i in range(len(matrices))}
    last = [0] * len(matrices)
    for step in range(18):
        train(model, opt, steps=1, seed=step)
        for i, p in enumerate(matrices):
            count = int(opt.state[p]["proj_refreshes"])
            if count != last[i]:
                seen[i].append(step)
                last[i] = count
    return seen


def test_refreshes_every_gap_steps():
    assert all(steps == [0, 6, 12] for steps in _refresh_steps(stagger=False).values())


def test_staggered_refreshes_land_on_different_steps():
    seen = _refresh_steps(stagger=True)
    assert all(steps[0] == 0 for steps in seen.values())  # a basis is needed at the first step
    later = [tuple(steps[1:]) for steps in seen.values()]
    assert len(set(later)) == len(later)  # no two matrices refresh together afterwards
    for steps in seen.values():
        gaps = [b - a for a, b in zip(steps[1:], steps[2:])]
        assert all(g == 6 for g in gaps)
