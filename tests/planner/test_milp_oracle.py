import random
from dataclasses import replace
from typing import Any

import pytest

from services.planner.inputs import resolve
from services.planner.milp import refit, solve_milp, undominated
from services.planner.oracle import solve_exhaustive
from services.planner.problem import Allocation, CapacityProblem, Config, Infeasible, Role
from services.planner.search import Mode, build_problem
from services.planner.spec import parse_spec
from tests.planner.instances import random_spec

INSTANCES = 55


def _problems(
    seed: int, count: int, mode: Mode = "disaggregated", **shape: Any
) -> list[CapacityProblem]:
    rng = random.Random(seed)
    return [
        build_problem(resolve(parse_spec(random_spec(rng, **shape))), mode).problem
        for _ in range(count)
    ]


def _cost(solution: Allocation | Infeasible) -> float | None:
    return solution.cost if isinstance(solution, Allocation) else None


def test_milp_cost_equals_the_exhaustive_oracle_on_random_small_instances() -> None:
    feasible = mixed = 0
    for index, problem in enumerate(_problems(seed=1, count=INSTANCES)):
        milp, oracle = solve_milp(problem), solve_exhaustive(problem)
        if isinstance(oracle, Infeasible):
            assert isinstance(milp, Infeasible), f"instance {index}"
            continue
        assert _cost(milp) == pytest.approx(oracle.cost, rel=1e-9), f"instance {index}"
        if isinstance(milp, Allocation):
            feasible += 1
            assert milp.served >= problem.demand * (1 - 1e-6)
            mixed += len({problem.configs[i].gpu for i, n in enumerate(milp.counts) if n}) > 1
    assert feasible >= INSTANCES * 0.8  # the equality is not vacuous
    assert mixed >= 5  # and some optima mix GPU types


def test_milp_equals_the_oracle_with_colocated_instances_in_the_search() -> None:
    """Prefill, decode and colocated configurations together (mixes allowed)."""
    colocated = 0
    for index, problem in enumerate(
        _problems(seed=11, count=20, mode="all", types=(2,), max_gpus=8, tp=(1, 2))
    ):
        milp, oracle = solve_milp(problem), solve_exhaustive(problem)
        if isinstance(oracle, Infeasible):
            assert isinstance(milp, Infeasible), f"instance {index}"
            continue
        assert _cost(milp) == pytest.approx(oracle.cost, rel=1e-9), f"instance {index}"
        if isinstance(milp, Allocation):
            used = {problem.configs[i].role for i, n in enumerate(milp.counts) if n}
            colocated += "colocated" in used
    assert colocated >= 3  # the colocated configurations take part


def test_max_goodput_matches_the_oracle() -> None:
    """The oracle solves an LP for every candidate within the budget: smaller instances."""
    served = 0
    for index, problem in enumerate(_problems(seed=7, count=12, types=(2,), max_gpus=8, tp=(1, 2))):
        budget = 4 * min((c.price_per_hour for c in problem.configs), default=1.0)
        goodput = replace(problem, demand=None, budget=budget)
        milp, oracle = solve_milp(goodput), solve_exhaustive(goodput)
        assert isinstance(milp, Allocation) == isinstance(oracle, Allocation), f"instance {index}"
        if isinstance(milp, Allocation) and isinstance(oracle, Allocation):
            served += 1
            assert milp.served == pytest.approx(oracle.served, rel=1e-6), f"instance {index}"
            assert milp.cost <= budget * (1 + 1e-9)
    assert served >= 8


def _config(
    role: Role, gpu: str, rate: float, gpus: int = 1, price: float = 1.0, **rate_to: float
) -> Config:
    return Config(
        role=role, gpu=gpu, tp=gpus, pp=1, price_per_hour=price * gpus, rate=rate, rate_to=rate_to
    )


def test_the_kv_link_forces_same_type_pairs() -> None:
    configs = (
        _config("prefill", "a", 0, price=1.0, a=10, b=10),
        _config("decode", "a", 6, price=5.0),
        _config("decode", "b", 10, price=1.0),
    )
    open_links = CapacityProblem(
        configs, {"a": 4, "b": 4}, {("a", "b"): 100, ("a", "a"): 100}, demand=10
    )
    cheap = solve_milp(open_links)
    assert isinstance(cheap, Allocation) and cheap.counts == (1, 0, 1) and cheap.cost == 2.0
    narrow = replace(open_links, link_rate={("a", "b"): 4, ("a", "a"): 100})
    split = solve_milp(narrow)
    assert isinstance(split, Allocation) and split.counts == (1, 1, 1)
    assert split.flows[(0, "b")] == pytest.approx(4) and split.flows[(0, "a")] == pytest.approx(6)
    assert _cost(solve_exhaustive(narrow)) == pytest.approx(split.cost)


def test_inventory_bounds_the_plan() -> None:
    configs = (_config("prefill", "a", 0, a=1), _config("decode", "a", 1))
    problem = CapacityProblem(configs, {"a": 5}, {("a", "a"): 100}, demand=3)
    assert isinstance(solve_milp(problem), Infeasible)
    assert isinstance(solve_milp(replace(problem, inventory={"a": 6})), Allocation)


def test_dominated_shapes_are_dropped_before_the_milp() -> None:
    configs = (
        _config("decode", "a", 10, gpus=1),
        _config("decode", "a", 15, gpus=2),  # two of the first carry 20 on 2 GPUs
        _config("decode", "a", 25, gpus=2),  # but this one carries more
        _config("decode", "a", 10, gpus=1),  # a duplicate of the first: the first stays
    )
    problem = CapacityProblem(configs, {"a": 8}, {}, demand=1)
    assert undominated(problem) == [0, 2]


def test_refit_keeps_counts_that_still_fit_and_refuses_those_that_do_not() -> None:
    configs = (
        _config("prefill", "a", 0, price=1.0, a=10),
        _config("decode", "a", 8, price=1.0),
    )
    problem = CapacityProblem(configs, {"a": 8}, {("a", "a"): 100}, demand=12)
    solution = solve_milp(problem)
    assert isinstance(solution, Allocation) and solution.counts == (2, 2)
    slack = replace(problem, configs=(configs[0], replace(configs[1], rate=7.0)))  # 14 >= 12
    kept = refit(slack, solution.counts)
    assert kept is not None and kept.counts == (2, 2) and kept.served == pytest.approx(12)
    assert _cost(solve_milp(slack)) == kept.cost  # still optimal, as the docstring argues
    short = replace(problem, configs=(configs[0], replace(configs[1], rate=5.0)))  # 10 < 12
    assert refit(short, solution.counts) is None
