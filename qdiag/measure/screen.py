"""Known-fact screening: every prompt of a set of facts scored once with the reference, so that
analyses of what quantization breaks start from prompts the reference answers right instead of
from random facts, most of which a small model never knew.

    screened = screen(model, facts)            # one row per prompt, scored (from the store if there)
    known = known_facts(screened, facts, 400)  # 400 reference-right prompts, stratified by relation

A prompt is kept exactly when the reference's top next token is the answer's first token (the
rule of ``evaluate.score_prompts``). Scores are kept in the run store per prompt, keyed by the
model's weights, its tokenizer and the scoring code (``evaluate.scoring_code``), so a larger screen
later scores only the new prompts.
"""

from __future__ import annotations

import time

import pandas as pd
from torch import nn

from ..core import store
from ..core.data import Fact, round_robin
from . import evaluate

SCORES = ["prob", "rank", "pred_id"]


def screen(model: nn.Module, facts: list[Fact], batch_size: int = 64, progress: bool = False) -> pd.DataFrame:
    """One row per prompt of ``facts`` (``evaluate.prompt_table``) with the reference's ``prob``,
    ``rank``, ``pred_id`` and ``correct``; ``.attrs`` holds ``seconds``, ``scored`` (prompts
    scored now) and ``stored`` (prompts read from the store)."""
    t0 = time.perf_counter()
    table = evaluate.prompt_table(facts, model.tokenizer)
    key = store.digest(store.model_digest(model), store.code_digest(*evaluate.scoring_code()))
    on = ["prompt", "answer_id"]
    old = store.load("screen", key)
    todo = table.drop_duplicates(on)
    if old is not None:
        todo = todo.merge(old[on], on=on, how="left", indicator=True)
        todo = todo[todo._merge == "left_only"].drop(columns="_merge")
    if len(todo):
        scored = evaluate.score_prompts(model, model.tokenizer, todo.reset_index(drop=True), batch_size, progress)
        old = pd.concat([old, scored[on + SCORES]], ignore_index=True) if old is not None else scored[on + SCORES]
        store.save("screen", key, old)
    out = table.merge(old.drop_duplicates(on), on=on, how="left", validate="m:1")
    out["rank"] = out["rank"].astype(int)
    out["pred_id"] = out["pred_id"].astype(int)
    out["correct"] = out["rank"] == 1
    out.attrs.update(seconds=time.perf_counter() - t0, scored=int(len(todo)), stored=int(len(table) - len(todo)))
    return out


def known_facts(screened: pd.DataFrame, facts: list[Fact], n_prompts: int | None = None,
                seed: int = 0) -> list[Fact]:
    """``n_prompts`` of the reference-right prompts of ``screened`` (all when None or when there
    are fewer), drawn round robin over relations in a seeded order so that no relation the model
    happens to know well crowds out the rest, returned as facts that hold only those templates.
    Raises when the reference answers none."""
    right = screened[screened.correct]
    if right.empty:
        raise ValueError(f"the reference answers none of the {len(screened)} screened prompts; screen more facts "
                         "(--screen-facts) or use a larger model")
    chosen = round_robin({rel: list(g.itertuples(index=False)) for rel, g in right.groupby("relation")},
                         n_prompts, seed)
    by_id = {f.id: f for f in facts}
    templates: dict[str, set[int]] = {}
    for row in chosen:  # facts in the order their first prompt was drawn
        templates.setdefault(row.fact, set()).add(row.template)
    return [Fact(f.relation, f.subject, f.obj, tuple(f.templates[t] for t in sorted(ts)))
            for f, ts in ((by_id[i], ts) for i, ts in templates.items())]


def summary(screened: pd.DataFrame, known: list[Fact]) -> dict:
    """What the screening found, for the run's records: prompts and facts screened, how many the
    reference answers right, how many were drawn, and how long it took."""
    right = screened[screened.correct]
    return {"prompts_screened": int(len(screened)), "facts_screened": int(screened.fact.nunique()),
            "reference_right": int(len(right)), "facts_known": int(right.fact.nunique()),
            "relations_known": int(right.relation.nunique()),
            "prompts_drawn": int(sum(len(f.templates) for f in known)),
            "screen_seconds": round(float(screened.attrs.get("seconds", float("nan"))), 1),
            "prompts_scored_now": int(screened.attrs.get("scored", 0))}


def describe(stats: dict) -> str:
    """One sentence for a notebook or a log: what the screening found (``summary``'s numbers)."""
    if not stats:
        return "no screening: the analyses use the random sample of facts as it is"
    reused = " (read from the store)" if stats["prompts_scored_now"] == 0 else ""
    return (f"screened {stats['prompts_screened']:,} prompts of {stats['facts_screened']:,} facts in "
            f"{stats['screen_seconds']:.0f} s{reused}: the reference answers {stats['reference_right']:,} "
            f"({stats['facts_known']:,} facts, {stats['relations_known']} relations); analysing "
            f"{stats['prompts_drawn']:,} of them, drawn by relation")
