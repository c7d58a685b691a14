"""The byte-budget allocation: within the budget, never worse than the best allocation of one step
less, the hull drops what is never worth buying, and the random baseline spends the same budget."""

import itertools
import random

import pytest

from qdiag.quant.allocate import Option, allocate, cheapest, hull, random_allocation, total


def instance(seed: int, tensors: int = 4, kinds: int = 4) -> dict[str, list[Option]]:
    rng = random.Random(seed)
    out = {}
    for t in range(tensors):
        size = rng.randint(10, 60)
        opts, dmg = [], rng.uniform(5, 50)
        for k in range(kinds):
            opts.append(Option(f"k{k}", size * (k + 2), dmg))
            dmg *= rng.uniform(0.1, 0.9)
        out[f"t{t}"] = opts
    return out


def best(options, budget):
    keys = list(options)
    found = None
    for combo in itertools.product(*(options[k] for k in keys)):
        b, d = sum(o.bytes for o in combo), sum(o.damage for o in combo)
        if b <= budget and (found is None or d < found):
            found = d
    return found


@pytest.mark.parametrize("seed", range(12))
def test_the_allocation_is_within_budget_and_near_the_best(seed):
    options = instance(seed)
    low = cheapest(options)
    high = sum(max(o.bytes for o in opts) for opts in options.values())
    budget = random.Random(seed).randint(low, high)
    choice = allocate(options, budget)
    spent, damage = total(choice)
    assert spent <= budget
    hulls = [hull(opts) for opts in options.values()]
    step = max(b.bytes - a.bytes for h in hulls for a, b in zip(h, h[1:]))
    assert damage <= best(options, max(budget - step, low)) + 1e-9  # the linear relaxation's bound
    assert damage >= best(options, budget) - 1e-9


def test_every_byte_to_the_most_damaging_tensor_first():
    options = {"quiet": [Option("q4", 100, 1.0), Option("q8", 200, 0.5)],
               "loud": [Option("q4", 100, 50.0), Option("q8", 200, 2.0)]}
    choice = allocate(options, 300)
    assert choice["loud"].kind == "q8" and choice["quiet"].kind == "q4"
    assert {o.kind for o in allocate(options, 400).values()} == {"q8"}
    with pytest.raises(ValueError, match="below the 200 bytes of the cheapest"):
        allocate(options, 199)


def test_the_hull_drops_options_never_worth_buying():
    opts = [Option("a", 10, 10.0), Option("b", 20, 9.9), Option("c", 30, 1.0), Option("d", 40, 2.0),
            Option("e", 30, 5.0)]
    assert [o.kind for o in hull(opts)] == ["a", "c"]


@pytest.mark.parametrize("seed", range(3))
def test_the_random_baseline_spends_the_budget_it_can(seed):
    options = instance(seed, tensors=8)
    budget = cheapest(options) + 300
    choice = random_allocation(options, budget, seed)
    spent, _ = total(choice)
    assert spent <= budget
    # nothing else fits: every remaining upgrade is dearer than what is left
    assert all(o.bytes - choice[t].bytes > budget - spent for t, opts in options.items() for o in opts
               if o.bytes > choice[t].bytes)
    assert random_allocation(options, budget, seed) == choice


def test_a_random_allocation_from_a_start_only_upgrades_it():
    options = {t: [Option(k, b, d) for k, b, d in (("a", 10, 5.0), ("b", 20, 2.0), ("c", 40, 1.0))] for t in "xyz"}
    start = {"x": "b", "y": "a", "z": "b"}
    for seed in range(5):
        choice = random_allocation(options, 60, seed, start=start)
        assert sum(o.bytes for o in choice.values()) <= 60
        assert all(choice[t].bytes >= next(o.bytes for o in options[t] if o.kind == k) for t, k in start.items())
    # a start dearer than the budget is dropped for the cheapest formats
    assert {o.kind for o in random_allocation(options, 30, 0, start={t: "c" for t in "xyz"}).values()} == {"a"}
