"""The evidence of a diagnosis: the probes of the study's diagnostic table, measured for one
configuration against the reference on the prompts the reference answers correctly.

The reference's side (its recorded layer inputs, its components, its logit lens, its ablation
profile) is computed once, in ``ReferenceState``, and shared by every configuration. Each
configuration then costs, per batch of prompts:

- one plain forward on its own stream, recording every component (the study's probes compare
  these with the reference's: attention entropy and JSD, gate sign flips, top-neuron overlap, MLP
  cosine, CKA, principal subspaces, error alignment, the logit lens, the answer's rank);
- one pass of its layers on the reference's inputs, each MLP fed the reference's MLP input
  (*local* probes: does each component, given what the reference gave it, still compute what
  the reference's computed? This is the mechanism that defines the two modes);
- with ``causal=True``, reruns of the layers above each patched, ablated or injected layer.

Every per-prompt quantity is kept as an array ``(prompts, layers)`` so that intervals can be
bootstrapped over prompts; sums are kept where a ratio of means is the statistic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import positions as P
from ..core.arch import resolve
from ..core.data import Fact
from ..measure import metrics as M
from ..measure.capture import Capture, capturing
from ..measure.patch import Edit, Rerun
from ..measure.readout import answer_prob, prob_and_rank, project
from ..measure.trace import eager_attention
from ..measure.widths import Reference, Width

POSITIONS = ("last_subject", "last")
TOP_FRACTION = 0.01
SUBSPACE_K = 50
LENS_ROWS = 128  # hidden states read through the unembedding per product


@dataclass
class _Batch:
    chunk: pd.DataFrame
    enc: dict
    answer: torch.Tensor  # (B,)
    idx: dict[str, torch.Tensor]  # position -> (B,) token index
    real: torch.Tensor  # (B, T) bool: not padding
    run: Rerun  # the reference's recorded layer inputs, and its logits
    cap: Capture  # the reference's components
    p_ref: torch.Tensor  # (B,) the reference's probability of the answer
    lens_ref: torch.Tensor  # (B, layers) the reference's logit lens probability of the answer
    ablated_ref: torch.Tensor | None = None  # (layers, positions, B) answer probability, resid zeroed


@dataclass
class ReferenceState:
    """The prompts the reference answers right, in batches, with everything the reference
    contributes to the probes, computed once."""

    batches: list[_Batch]
    n_prompts: int
    n_layers: int
    vocab: int
    rows_ref: list[torch.Tensor] = field(default_factory=list)  # per layer (tokens, d_model), pooled
    dirs_ref: list[torch.Tensor] = field(default_factory=list)  # per layer, rows_ref's top SUBSPACE_K directions
    d_mlp: int = 0
    cka_null: float = float("nan")  # mean over layers: CKA of the reference with its tokens shuffled


def reference_state(model: nn.Module, facts: list[Fact], batch_size: int = 64, max_prompts: int | None = None,
                    max_tokens: int = 2048, causal: bool = True, seed: int = 0,
                    progress: bool = False) -> ReferenceState:
    """Score every prompt of ``facts`` with the reference, keep those it answers right (at most
    ``max_prompts``, a seeded sample), and record the reference on them."""
    ref = Reference(model, facts, progress=progress)
    right = ref.table[ref.scored.correct.to_numpy()]
    if right.empty:
        raise ValueError(f"the reference answers none of the {len(ref.table)} prompts correctly: there is no "
                         "behaviour to diagnose; use more facts (--facts) or a model that knows some")
    if max_prompts is not None and len(right) > max_prompts:
        right = right.sample(max_prompts, random_state=seed).sort_index()
    n_layers = resolve(model).n_layers
    state = ReferenceState([], len(right), n_layers, 0, [[] for _ in range(n_layers)])
    n_rows = 0
    for chunk in tqdm(P.batches(right, facts, batch_size), desc="reference", disable=not progress, leave=False):
        enc = P.encode(model.tokenizer, chunk.prompt.tolist(), chunk.subject_end.tolist())
        answer = torch.tensor(chunk.answer_id.to_numpy())
        with eager_attention(model), capturing(model) as cap:
            run = Rerun(model, enc)
        state.vocab = run.logits.shape[-1]
        b = _Batch(chunk, enc, answer, {p: P.token_index(enc, p) for p in POSITIONS},
                   enc["attention_mask"].bool(), run, cap, answer_prob(run.logits, answer), _lens(model, cap, answer))
        if causal:
            with eager_attention(model):
                b.ablated_ref = _sweep(run, b, n_layers, lambda layer, pos: Edit(layer, "resid", b.idx[pos], 0.0))
        n_rows = _pool(state.rows_ref, cap, b.real, n_rows, max_tokens)
        state.batches.append(b)
    state.rows_ref = [torch.cat(r) for r in state.rows_ref]
    state.dirs_ref = [M.principal_directions(r, SUBSPACE_K) for r in state.rows_ref]
    state.d_mlp = state.batches[0].cap.gate[0].shape[-1]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(state.rows_ref[0].shape[0], generator=g)
    state.cka_null = float(np.mean([M.linear_cka(x, x[perm]) for x in state.rows_ref]))
    return state


def _pool(rows: list[list], cap: Capture, real: torch.Tensor, n: int, max_tokens: int) -> int:
    """Append the batch's real tokens' residual stream per layer, up to ``max_tokens`` rows."""
    if n >= max_tokens:
        return n
    for layer, store in enumerate(rows):
        store.append(cap.resid[layer][real.to(cap.resid[layer].device)][: max_tokens - n].cpu())
    return n + rows[0][-1].shape[0]


def _lens(model: nn.Module, cap: Capture, answer: torch.Tensor) -> torch.Tensor:
    """``(B, layers)`` probability of the answer when each layer's residual stream at the last token
    is read through the final norm and unembedding."""
    last = torch.stack([cap.resid[layer][:, -1] for layer in sorted(cap.resid)])  # (layers, B, d_model)
    # a few layers per product: as fast as one large product, without a (layers, B, vocab) array
    step = max(1, LENS_ROWS // last.shape[1])
    return torch.cat([answer_prob(project(model, last[i : i + step]), answer)
                      for i in range(0, len(last), step)]).t()


def _sweep(run: Rerun, b: _Batch, n_layers: int, make) -> torch.Tensor:
    """Answer probability with one edit per (layer, position), the positions of a layer side by
    side: ``(layers, positions, B)``."""
    out = torch.empty(n_layers, len(POSITIONS), len(b.answer))
    for layer in range(n_layers):
        logits, _ = run.run([[make(layer, pos)] for pos in POSITIONS])
        out[layer] = answer_prob(logits, b.answer)
    return out


def _per_prompt(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean over each prompt's real tokens of ``x (B, T)``: ``(B,)``."""
    real = real.to(x.device).float()
    return ((x * real).sum(1) / real.sum(1).clamp_min(1)).cpu()


def _at(x: torch.Tensor, b: _Batch, pos: str) -> torch.Tensor:
    """Rows of ``x (B, T, ...)`` at one token per prompt."""
    return x[torch.arange(x.shape[0]), b.idx[pos].to(x.device)]


def _attn_rows(a: torch.Tensor, b: _Batch, pos: str) -> torch.Tensor:
    """``(B, head, key)`` attention rows of the query at ``pos``."""
    return _at(a.transpose(1, 2), b, pos)


def _stack(per_layer: list[list[torch.Tensor]]) -> np.ndarray:
    """``[layer][batch] -> (prompts, layers)``."""
    return torch.stack([torch.cat(parts) for parts in per_layer], 1).numpy()


# The arrays a configuration's measurement holds, ``(prompts, layers)`` unless noted.
LOCAL = ("jsd", "jsd_null", "attn_cos", "sfr", "jaccard", "mlp_cos")
PROPAGATED = ("entropy", "entropy_ref", "jsd", "jsd_null", "sfr", "jaccard", "mlp_cos")


def measure(model: nn.Module, state: ReferenceState, width: Width, causal: bool = True,
            max_tokens: int = 2048, progress: bool = False) -> dict:
    """Every probe's raw material for one configuration (see the module docstring)."""
    n_layers = state.n_layers
    local = {k: [[] for _ in range(n_layers)] for k in LOCAL}
    prop = {k: [[] for _ in range(n_layers)] for k in PROPAGATED}
    out: dict[str, list] = {k: [] for k in ("p_ref", "p_q", "rank", "correct", "lens_q", "lens_ref", "patched",
                                            "injected", "ablated_q", "ablated_ref")}
    rows_q: list[list] = [[] for _ in range(n_layers)]
    n_rows = 0
    mid = n_layers // 2
    for b in tqdm(state.batches, desc=f"diagnose {width.method} {width.bits}-bit", disable=not progress,
                  leave=False):
        with eager_attention(model), width.applied(model):
            with capturing(model) as qcap:
                qrun = Rerun(model, b.enc)
            with capturing(model, mlp_inputs=b.cap.mlp_in) as loc:
                for layer in range(n_layers):  # each layer on the reference's input, read and dropped
                    b.run.layers[layer](b.run.inputs[layer], *b.run.args[layer], **b.run.kwargs[layer])
                    _local(local, layer, b, loc)
                    loc.drop(layer)
            if causal:
                out["patched"].append(_sweep(qrun, b, n_layers, lambda layer, pos: Edit(
                    layer, "resid", b.idx[pos], _at(b.cap.resid[layer], b, pos))))
                out["ablated_q"].append(_sweep(qrun, b, n_layers, lambda layer, pos: Edit(
                    layer, "resid", b.idx[pos], 0.0)))
                out["ablated_ref"].append(b.ablated_ref)
                inj = [Edit(mid - 1, "resid", None, b.cap.resid[mid - 1])] if mid >= 1 else []
                out["injected"].append(answer_prob(qrun.run([inj], start=max(mid - 1, 0))[0], b.answer)[0])
        p_q, rank = prob_and_rank(qrun.logits, b.answer)
        out["p_ref"].append(b.p_ref)
        out["p_q"].append(p_q.cpu())
        out["rank"].append(rank.cpu())
        out["correct"].append((rank == 1).cpu())
        out["lens_q"].append(_lens(model, qcap, b.answer))
        out["lens_ref"].append(b.lens_ref)
        for layer in range(n_layers):
            _propagated(prop, layer, b, qcap)
        n_rows = _pool(rows_q, qcap, b.real, n_rows, max_tokens)
    res = {f"local_{k}": _stack(v) for k, v in local.items()}
    res.update({f"prop_{k}": _stack(v) for k, v in prop.items()})
    for k in ("p_ref", "p_q", "rank", "correct", "injected"):
        if out[k]:
            res[k] = torch.cat(out[k]).numpy()
    res["lens_q"], res["lens_ref"] = torch.cat(out["lens_q"]).numpy(), torch.cat(out["lens_ref"]).numpy()
    for k in ("patched", "ablated_q", "ablated_ref"):
        if out[k]:
            res[k] = torch.cat(out[k], -1).numpy()  # (layers, positions, prompts)
    rows_q = [torch.cat(r) for r in rows_q]
    k = min(SUBSPACE_K, *state.rows_ref[0].shape)
    pairs = list(zip(state.rows_ref, rows_q, state.dirs_ref))
    res["cka"] = float(np.mean([M.linear_cka(a, b) for a, b, _ in pairs]))
    res["subspace"] = float(np.mean([M.activation_subspace_similarity(a, b, k, u) for a, b, u in pairs]))
    res["alignment"] = float(np.mean([M.error_alignment(a, b, k, u) for a, b, u in pairs]))
    res.update(k_over_d=k / state.rows_ref[0].shape[1], cka_null=state.cka_null, d_mlp=state.d_mlp, vocab=state.vocab)
    return res


def _local(store: dict, layer: int, b: _Batch, loc: Capture) -> None:
    """Each component run on the reference's input against the reference's own, per prompt."""
    ref = b.cap
    a_ref, a_loc = ref.attn[layer], loc.attn[layer]  # (B, H, T, T)
    store["jsd"][layer].append(_per_prompt(M.js_divergence(a_ref, a_loc).mean(1), b.real))
    store["jsd_null"][layer].append(_per_prompt(M.js_divergence(a_ref, M.uniform_like(a_ref)).mean(1), b.real))
    store["attn_cos"][layer].append(_per_prompt(M.cosines(ref.attn_out[layer], loc.attn_out[layer]), b.real))
    store["sfr"][layer].append(_per_prompt(M.sign_flips(ref.gate[layer], loc.gate[layer]), b.real))
    store["jaccard"][layer].append(_per_prompt(M.topk_overlap(ref.gate[layer], loc.gate[layer], TOP_FRACTION), b.real))
    store["mlp_cos"][layer].append(_per_prompt(M.cosines(ref.mlp_out[layer], loc.mlp_out[layer]), b.real))


def _propagated(store: dict, layer: int, b: _Batch, q: Capture) -> None:
    """The study's component probes: each model on its own stream, at the last subject token and
    the last token (averaged over the two)."""
    ref = b.cap
    vals: dict[str, list] = {k: [] for k in PROPAGATED}
    for pos in POSITIONS:
        a_ref, a_q = _attn_rows(ref.attn[layer], b, pos), _attn_rows(q.attn[layer], b, pos)  # (B, H, K)
        visible = (a_ref > 0).sum(-1)
        vals["entropy"].append(M.attention_entropy(a_q, visible).mean(1))
        vals["entropy_ref"].append(M.attention_entropy(a_ref, visible).mean(1))
        vals["jsd"].append(M.js_divergence(a_ref, a_q).mean(1))
        vals["jsd_null"].append(M.js_divergence(a_ref, M.uniform_like(a_ref)).mean(1))
        g_ref, g_q = _at(ref.gate[layer], b, pos), _at(q.gate[layer], b, pos)
        vals["sfr"].append(M.sign_flips(g_ref, g_q))
        vals["jaccard"].append(M.topk_overlap(g_ref, g_q, TOP_FRACTION))
        vals["mlp_cos"].append(M.cosines(_at(ref.mlp_out[layer], b, pos), _at(q.mlp_out[layer], b, pos)))
    for k, v in vals.items():
        store[k][layer].append(torch.stack(v).mean(0).cpu())
