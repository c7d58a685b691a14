"""Bits under a byte budget: given, for every tensor, the formats it may be stored in with each one's
bytes and predicted damage, choose one format per tensor so that the total damage is smallest and
the bytes stay within the budget (a multiple-choice knapsack).

Each tensor's options are reduced to their lower convex hull in (bytes, damage): an option above
the line between two cheaper and dearer ones is never the best buy. Every tensor starts at its
cheapest option; then the upgrade with the largest damage saved per byte that still fits is taken,
again and again (the greedy solution of the problem's linear relaxation, which is optimal there;
on the integer problem it can leave at most one upgrade's worth of bytes unspent); the bytes left
then buy any single upgrade that fits, best ratio first.

    choice = allocate(options, budget)     # {tensor: option}
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One way to store one tensor: its format, its bytes and its predicted damage."""

    kind: str
    bytes: int
    damage: float


def hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, damage), cheapest first; of options with
    equal bytes the least damaging is kept."""
    best: dict[int, Option] = {}
    for o in options:
        if o.bytes not in best or o.damage < best[o.bytes].damage:
            best[o.bytes] = o
    pts = sorted(best.values(), key=lambda o: o.bytes)
    # dearer options that do not lower the damage are never bought
    kept: list[Option] = []
    for o in pts:
        if kept and o.damage >= kept[-1].damage:
            continue
        while len(kept) >= 2 and _cross(kept[-2], kept[-1], o) <= 0:
            kept.pop()
        kept.append(o)
    return kept


def _cross(a: Option, b: Option, c: Option) -> float:
    return (b.bytes - a.bytes) * (c.damage - a.damage) - (b.damage - a.damage) * (c.bytes - a.bytes)


def cheapest(options: dict[str, list[Option]]) -> int:
    """The fewest bytes any allocation of these options takes."""
    return sum(min(o.bytes for o in opts) for opts in options.values())


def allocate(options: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """One option per tensor, total bytes at most ``budget``, total damage as small as the module
    docstring's method finds; raises when even the cheapest options exceed the budget."""
    if not options:
        raise ValueError("nothing to allocate: no tensors given")
    low = cheapest(options)
    if low > budget:
        raise ValueError(f"the budget of {budget:,} bytes is below the {low:,} bytes of the cheapest formats; "
                         "give a larger budget")
    hulls = {t: hull(opts) for t, opts in options.items()}
    at = {t: 0 for t in hulls}
    spent = sum(h[0].bytes for h in hulls.values())
    heap = [(-_gain(h, 0), t) for t, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    skipped = []
    while heap:
        _, t = heapq.heappop(heap)
        h, i = hulls[t], at[t]
        step = h[i + 1].bytes - h[i].bytes
        if spent + step > budget:
            skipped.append(t)
            continue
        at[t], spent = i + 1, spent + step
        if i + 2 < len(h):
            heapq.heappush(heap, (-_gain(h, i + 1), t))
    choice = {t: hulls[t][at[t]] for t in hulls}
    # what is left buys single upgrades, any option of the tensor (not only the next on its hull)
    left = budget - spent
    ups = sorted(((o.damage - choice[t].damage) / max(o.bytes - choice[t].bytes, 1), t, o)
                 for t, opts in options.items() for o in opts
                 if o.bytes > choice[t].bytes and o.damage < choice[t].damage)
    for _, t, o in ups:
        extra = o.bytes - choice[t].bytes
        if extra <= left and o.damage < choice[t].damage:
            left -= extra
            choice[t] = o
    return choice


def _gain(h: list[Option], i: int) -> float:
    """Damage saved per byte by the step from hull point ``i`` to ``i + 1``."""
    return (h[i].damage - h[i + 1].damage) / max(h[i + 1].bytes - h[i].bytes, 1)


def random_allocation(options: dict[str, list[Option]], budget: int, seed: int = 0,
                      start: dict[str, str] | None = None) -> dict[str, Option]:
    """The baseline: every tensor at its cheapest option (or at its format in ``start``, where the
    menu has it: the same bytes over a file spent at random), then upgrades drawn at random (a
    random tensor to a random dearer option) taken while they fit, until none does."""
    rng = random.Random(seed)
    choice = {t: min(opts, key=lambda o: (o.bytes, o.damage)) for t, opts in options.items()}
    if start:
        for t, kind in start.items():
            choice[t] = next((o for o in options.get(t, []) if o.kind == kind), choice.get(t))
        if sum(o.bytes for o in choice.values()) > budget:
            choice = {t: min(opts, key=lambda o: (o.bytes, o.damage)) for t, opts in options.items()}
    left = budget - sum(o.bytes for o in choice.values())
    if left < 0:
        raise ValueError(f"the budget of {budget:,} bytes is below the cheapest formats' {budget - left:,}")
    moves = [(t, o) for t, opts in options.items() for o in opts]
    rng.shuffle(moves)
    changed = True
    while changed:
        changed = False
        for t, o in moves:
            extra = o.bytes - choice[t].bytes
            if 0 < extra <= left:
                choice[t], left, changed = o, left - extra, True
    return choice


def total(choice: dict[str, Option]) -> tuple[int, float]:
    """Bytes and damage of an allocation."""
    return sum(o.bytes for o in choice.values()), sum(o.damage for o in choice.values())
