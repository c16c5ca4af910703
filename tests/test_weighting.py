"""Loss weighting methods against steps computed by hand, and their state across a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from nddrify.errors import FusionConfigError
from nddrify.weighting import (
    FAMO,
    WEIGHTINGS,
    DynamicWeightAverage,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
    make_weighting,
)

TASKS = ("seg", "normal")


def losses(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"seg": torch.tensor(a), "normal": torch.tensor(b)}


def test_equal_and_fixed() -> None:
    assert make_weighting("equal", TASKS)(losses(2.0, 3.0)).item() == 5.0
    fixed = make_weighting("fixed", TASKS, weights={"seg": 1.0, "normal": 20.0})
    assert fixed(losses(2.0, 3.0)).item() == 62.0
    assert fixed([torch.tensor(1.0), torch.tensor(0.5)]).item() == 11.0  # a list, in task order


def test_uncertainty_total_and_gradient_by_hand() -> None:
    weighting = UncertaintyWeighting(TASKS)
    with torch.no_grad():
        weighting.log_variance.copy_(torch.tensor([0.0, math.log(4.0)]))
    a = torch.tensor(2.0, requires_grad=True)
    total = weighting({"seg": a, "normal": torch.tensor(8.0)})
    # ½·1·2 + ½·0 + ½·(1/4)·8 + ½·log 4
    assert total.item() == pytest.approx(1.0 + 1.0 + 0.5 * math.log(4.0))
    total.backward()
    assert a.grad.item() == pytest.approx(0.5)
    # d/ds_i = −½·e^{−s_i}·L_i + ½: seg −1 + ½, normal −½·¼·8 + ½
    assert weighting.log_variance.grad.tolist() == pytest.approx([-0.5, -0.5])


def test_dwa_uses_the_ratio_of_the_last_two_epoch_means() -> None:
    dwa = DynamicWeightAverage(TASKS, temperature=2.0)
    for value in ((4.0, 2.0), (2.0, 2.0)):  # epoch 1: one step per epoch is enough
        dwa(losses(*value))
        assert dwa.last_weights.tolist() == [1.0, 1.0]
        dwa.end_epoch()
    dwa(losses(6.0, 1.0)), dwa(losses(2.0, 3.0))  # epoch 3: weights from epochs 1 and 2 only
    # r = (2/4, 2/2) = (0.5, 1); w = 2·softmax(r/2)
    e = [math.exp(0.25), math.exp(0.5)]
    assert dwa.last_weights.tolist() == pytest.approx([2 * e[0] / sum(e), 2 * e[1] / sum(e)])
    dwa.end_epoch()  # epoch 3's mean (4, 2): r = (4/2, 2/2)
    dwa(losses(1.0, 1.0))
    e = [math.exp(1.0), math.exp(0.5)]
    assert dwa.last_weights.tolist() == pytest.approx([2 * e[0] / sum(e), 2 * e[1] / sum(e)])


def test_rlw_draws_softmax_normal_weights_reproducibly() -> None:
    rlw = RandomLossWeighting(TASKS, seed=7)
    total = rlw(losses(1.0, 3.0))
    z = torch.randn(2, generator=torch.Generator().manual_seed(7))
    expected = torch.softmax(z, 0)
    assert rlw.last_weights.tolist() == pytest.approx(expected.tolist())
    assert total.item() == pytest.approx(expected[0].item() + 3 * expected[1].item())
    state = {k: v.clone() for k, v in rlw.state_dict().items()}
    following = [rlw(losses(1.0, 1.0)) and rlw.last_weights.clone() for _ in range(3)]
    resumed = RandomLossWeighting(TASKS, seed=0)
    resumed.load_state_dict(state)
    again = [resumed(losses(1.0, 1.0)) and resumed.last_weights.clone() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(following, again))


def test_gradnorm_step_by_hand() -> None:
    w_shared = torch.tensor([1.0, 2.0], requires_grad=True)
    gradnorm = GradNorm(TASKS, [w_shared], alpha=1.0, lr=0.1)
    # L_seg = 3·(w·[1,0]) → ∇ = [3, 0], ‖·‖ = 3; L_normal = w·[0, 4] → ‖∇‖ = 4
    total = gradnorm({"seg": 3 * w_shared[0], "normal": 4 * w_shared[1]})
    assert total.item() == pytest.approx(3 * 1.0 + 8.0)  # weights 1 at the first step
    # first step: rates 1 → targets mean(G) = 3.5; G = (3, 4): sign(G − t)·n = (−3, 4)
    # w = (1 + 0.3, 1 − 0.4) = (1.3, 0.6), renormalised to sum 2
    assert gradnorm.task_weights.tolist() == pytest.approx([2 * 1.3 / 1.9, 2 * 0.6 / 1.9])


def test_famo_weights_and_update_by_hand() -> None:
    famo = FAMO(TASKS, lr=0.1, gamma=0.0)
    a = torch.tensor(2.0, requires_grad=True)
    total = famo({"seg": a, "normal": torch.tensor(4.0)})
    # z = (½, ½), c = ½/2 + ½/4 = 3/8; w_i = z_i / (c·L_i) = (2/3, 1/3); total = Σ w_i L_i
    assert famo.last_weights.tolist() == pytest.approx([2 / 3, 1 / 3])
    assert total.item() == pytest.approx(2 / 3 * 2 + 1 / 3 * 4)
    total.backward()
    assert a.grad.item() == pytest.approx(0.5 / 2 / 0.375)  # z_i / (c·L_i)
    famo.after_step(losses(1.0, 4.0))  # seg's log-loss fell by log 2, normal's not at all
    delta = torch.tensor([math.log(2.0), 0.0])
    z = torch.tensor([0.5, 0.5])
    g = z * (delta - (z * delta).sum())  # (¼ log 2, −¼ log 2)
    # Adam's first step moves each logit by lr·sign(g)
    expected = -0.1 * g / (g.abs() + 1e-8 * math.sqrt(1 - 0.999))
    assert famo.logits.tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert famo.logits[1] > famo.logits[0]  # the task that improved least gains weight


@pytest.mark.parametrize("name", ["uncertainty", "dwa", "famo", "rlw"])
def test_state_survives_a_checkpoint_bit_exactly(name: str, tmp_path) -> None:
    def make() -> torch.nn.Module:
        return make_weighting(name, TASKS)

    def run(weighting: torch.nn.Module, steps: range) -> list[torch.Tensor]:
        out = []
        for step in steps:
            values = losses(1.0 + 0.1 * step, 2.0 / (1 + step))
            out.append(weighting(values).detach())
            weighting.after_step(losses(0.9 + 0.1 * step, 1.9 / (1 + step)))
            if step % 2 == 1:
                weighting.end_epoch()
        return out

    straight = make()
    expected = run(straight, range(6))
    first = make()
    run(first, range(3))
    torch.save(first.state_dict(), tmp_path / "w.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    assert [t.item() for t in run(resumed, range(3, 6))] == [t.item() for t in expected[3:]]


def test_observed_losses_drive_the_weights() -> None:
    # data-parallel: the weights follow the global losses, the total this process's share
    famo, dwa = FAMO(TASKS), DynamicWeightAverage(TASKS)
    local = {"seg": torch.tensor(1.0, requires_grad=True), "normal": torch.tensor(3.0)}
    total = famo(local, observed=losses(2.0, 4.0))
    assert famo.last_weights.tolist() == pytest.approx([2 / 3, 1 / 3])
    assert total.item() == pytest.approx(2 / 3 * 1.0 + 1 / 3 * 3.0)
    dwa(local, observed=losses(2.0, 4.0))
    assert dwa.running_sum.tolist() == [2.0, 4.0]
    with pytest.raises(FusionConfigError, match="does not support data-parallel"):
        GradNorm(TASKS, [torch.ones(1, requires_grad=True)])(local, observed=local)


def test_bad_names_and_options_are_refused() -> None:
    with pytest.raises(FusionConfigError, match="unknown loss weighting 'dwq'"):
        make_weighting("dwq", TASKS)
    with pytest.raises(FusionConfigError, match="loss weighting 'dwa'"):
        make_weighting("dwa", TASKS, temprature=2.0)
    with pytest.raises(FusionConfigError, match="losses are for tasks"):
        make_weighting("equal", TASKS)({"seg": torch.tensor(1.0)})
    assert sorted(WEIGHTINGS) == ["dwa", "equal", "famo", "fixed", "gradnorm", "rlw", "uncertainty"]
