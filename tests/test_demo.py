"""The demo sizes itself from the machine's measured training speed to fit its time budget."""

from __future__ import annotations

import dataclasses

import pytest

from pneumodet.demo import (
    BUDGET_SHARE,
    DEMO_SIZES,
    MIN_EPOCHS,
    estimate_demo_seconds,
    measure_training_step,
    plan_demo,
    plan_from_dict,
    size_demo,
    step_cost,
)
from pneumodet.errors import ConfigError

TEN_MINUTES = 600.0
#: s/step of resnet50 at 256 px (batch 8): a 2-core CPU with AVX512-BF16 (today's demo in about 5 minutes)
#: and a 2-core AVX2 CPU in fp32 (one demo epoch took about 5 minutes there: the demo took 40).
FAST_BF16, SLOW_FP32 = 0.7, 6.7


def test_a_fast_bf16_machine_keeps_todays_demo():
    plan = plan_demo(FAST_BF16, "bf16")
    assert plan.size == DEMO_SIZES[0] == dataclasses.replace(plan.size, encoder="resnet50", image_size=256,
                                                             fpn_channels=256, epochs=8, patients=400)
    assert plan.fits and plan.estimated_seconds <= BUDGET_SHARE * TEN_MINUTES
    assert plan.seconds_per_step == FAST_BF16 and plan.precision == "bf16"
    assert "resnet50, 256 px" in plan.reason and "1.43 training steps/s" in plan.reason and "bf16" in plan.reason


def test_a_slow_fp32_machine_gets_a_smaller_demo_that_fits():
    assert estimate_demo_seconds(DEMO_SIZES[0], SLOW_FP32) > 3 * TEN_MINUTES  # today's demo: far over
    plan = plan_demo(SLOW_FP32, "fp32")
    assert plan.fits and plan.estimated_seconds <= BUDGET_SHARE * TEN_MINUTES
    assert step_cost(plan.size.network, "fp32") < step_cost(DEMO_SIZES[0].network, "fp32") / 4
    assert plan.size.epochs >= MIN_EPOCHS and plan.size in DEMO_SIZES
    assert plan.seconds_per_step == pytest.approx(SLOW_FP32 * step_cost(plan.size.network, "fp32"))
    assert "fp32" in plan.reason and "chose resnet18" in plan.reason


def test_a_larger_budget_buys_a_larger_demo():
    assert plan_demo(SLOW_FP32, "fp32", budget_seconds=60 * 60).size == DEMO_SIZES[0]


def test_a_slower_machine_never_gets_a_larger_demo():
    plans = [plan_demo(seconds, "fp32") for seconds in (0.5, 1, 2, 4, 8, 16, 32)]
    costs = [estimate_demo_seconds(p.size, 1.0) for p in plans]  # the work each plan asks for
    assert costs == sorted(costs, reverse=True)
    assert all(p.fits for p in plans[:-1])


def test_a_machine_too_slow_for_any_plan_gets_the_smallest_and_is_told():
    plan = plan_demo(200.0, "fp32")
    assert not plan.fits and plan.size.epochs == MIN_EPOCHS
    assert plan.size.network == DEMO_SIZES[-1].network
    assert "over" in plan.reason


def test_the_measurement_counts_against_the_budget():
    free = plan_demo(SLOW_FP32, "fp32")
    spent = plan_demo(SLOW_FP32, "fp32", spent_seconds=120)
    assert spent.estimated_seconds <= BUDGET_SHARE * TEN_MINUTES
    assert estimate_demo_seconds(spent.size, 1.0) < estimate_demo_seconds(free.size, 1.0)


@pytest.mark.parametrize("seconds, budget", [(0.0, 600), (-1.0, 600), (float("nan"), 600), (1.0, 0.0),
                                             (1.0, float("inf"))])
def test_impossible_speeds_or_budgets_are_config_errors(seconds, budget):
    with pytest.raises(ConfigError):
        plan_demo(seconds, "fp32", budget_seconds=budget)


def test_size_demo_times_the_chosen_network_and_plans_from_it():
    """The first measurement is resnet50's; the chosen network is timed too, and the plan rests on it."""
    first = DEMO_SIZES[0].network
    speeds = {first: SLOW_FP32}
    timed = []

    def measure(network):
        timed.append(network)
        return speeds.get(network, SLOW_FP32 * step_cost(network, "fp32") * 1.3)  # 30 % slower than said

    now = iter([0.0, 10.0, 20.0])
    plan = size_demo("fp32", budget_seconds=TEN_MINUTES, measure=measure, say=lambda _: None,
                     clock=lambda: next(now))
    assert timed[0] == first and len(timed) == 2 and plan.measured == timed[1] != first
    assert plan.measured_seconds_per_step == pytest.approx(SLOW_FP32 * step_cost(timed[1], "fp32") * 1.3)
    assert plan.fits and plan.estimated_seconds <= BUDGET_SHARE * TEN_MINUTES

    timed.clear()  # a fast machine: resnet50 fits, nothing more to time
    fast = size_demo("bf16", budget_seconds=TEN_MINUTES, measure=lambda n: timed.append(n) or FAST_BF16,
                     say=lambda _: None)
    assert timed == [first] and fast.size == DEMO_SIZES[0]


def test_a_recorded_plan_reads_back():
    plan = plan_demo(SLOW_FP32, "fp32")
    assert plan_from_dict(plan.to_dict()) == plan
    with pytest.raises(ConfigError, match="not a demo plan"):
        plan_from_dict({"size": {}})


def test_measure_training_step_times_a_tiny_network():
    seconds = measure_training_step(("resnet18", 64, 16), "fp32", batch_size=2, steps=1, warmup=0)
    assert 0 < seconds < 120


@pytest.mark.parametrize("args, message", [
    (["--budget-minutes", "0"], "time budget must be a positive number"),
    (["--budget-minutes", "nan"], "time budget must be a positive number"),
    (["--patients", "5"], "at least 60 patients"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--precision", "fp8"], "unknown precision"),
])
def test_demo_refuses_bad_options_before_timing_the_machine(tmp_path, capsys, args, message):
    from pneumodet.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


def test_measure_training_step_stops_timing_past_its_share_of_the_budget():
    """One timed step, then the cap: 1000 steps would not finish in a test's time."""
    seconds = measure_training_step(("resnet18", 64, 16), "fp32", batch_size=2, steps=1000, warmup=0,
                                    max_seconds=0.0)
    assert seconds > 0
