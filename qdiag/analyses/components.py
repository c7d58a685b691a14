"""Component functions under quantization (analysis 4 of the paper): does each attention head
still look where it looked, and does each MLP still open the same gates?

For every configuration the quantized model and the reference run the same prompts; per layer
and head, and per token position kind, the runner averages over tokens:

- ``attn_entropy`` / ``attn_entropy_fp``: normalized attention entropy of the query at that
  position (``metrics.attention_entropy``; keys visible to it: its position + 1, capped by the
  layer's sliding window), quantized and reference;
- ``attn_jsd``: Jensen-Shannon divergence (natural log, at most ln 2) between the two models'
  attention rows;
- per layer only: ``gate_sfr`` (sign flip rate of the MLP gate pre-activations), ``neuron_jaccard``
  (overlap of the top ``top_fraction`` gate pre-activations) and ``mlp_cosine`` (cosine of the
  MLP outputs). Families without a gated MLP (gpt2, gpt_neox) use the first MLP projection's
  pre-activation in place of the gate.

Rows with ``head`` set carry the attention metrics of that head; rows with ``head`` missing carry
the layer's attention metrics averaged over heads and its MLP metrics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import positions as P
from ..core.arch import attention_window, resolve
from ..core.data import Fact
from ..core.io import save_analysis
from ..measure import metrics as M
from ..measure.evaluate import prompt_table
from ..measure.trace import collect
from ..measure.widths import Width, check_configs, each_width
from ..quant.quantize import QuantSpec
from ..report.plots import attention_figure, mlp_figure

WHAT = ("attn", "gate", "mlp_out")


def _tokens(batch: dict, positions: list[str]) -> torch.Tensor | None:
    """Positions to keep inside the trace: None (all) when 'all' is asked for."""
    if "all" in positions:
        return None
    return torch.stack([P.token_index(batch, p) for p in positions], 1)


def _rows_at(x: torch.Tensor, batch: dict, positions: list[str], position: str, full: bool,
             attn: bool = False) -> torch.Tensor:
    """Token rows of a collected tensor at one position kind: ``(n, ...)``."""
    if full:
        if attn:  # (batch, head, query, key) -> (batch, query, head, key)
            x = x.transpose(1, 2)
        return P.select(x, batch, position)
    return x[:, positions.index(position)]


def _visible(batch: dict, window: int | None) -> torch.Tensor:
    n = batch["position_ids"].cpu() + 1
    return n.clamp(max=window) if window else n


def compare_batch(fp: dict, q: dict, batch: dict, positions: list[str], windows: list[int | None],
                  top_fraction: float) -> list[dict]:
    """Per (position, layer[, head]) sums of the metrics over one batch's tokens, and the count."""
    full = "all" in positions
    out = []
    for layer in range(len(fp["attn"])):
        vis = _visible(batch, windows[layer])
        for pos in positions:
            a_fp = _rows_at(fp["attn"][layer], batch, positions, pos, full, attn=True)  # (n, head, key)
            a_q = _rows_at(q["attn"][layer], batch, positions, pos, full, attn=True)
            v = P.select(vis, batch, pos)[:, None]  # (n, 1)
            n = a_fp.shape[0]
            ent_fp = M.attention_entropy(a_fp, v).sum(0)
            ent_q = M.attention_entropy(a_q, v).sum(0)
            jsd = M.js_divergence(a_fp, a_q).sum(0)
            g_fp = _rows_at(fp["gate"][layer], batch, positions, pos, full)
            g_q = _rows_at(q["gate"][layer], batch, positions, pos, full)
            o_fp = _rows_at(fp["mlp_out"][layer], batch, positions, pos, full)
            o_q = _rows_at(q["mlp_out"][layer], batch, positions, pos, full)
            for h in range(a_fp.shape[1]):
                out.append({"position": pos, "layer": layer, "head": h, "n": n, "attn_entropy_fp": float(ent_fp[h]),
                            "attn_entropy": float(ent_q[h]), "attn_jsd": float(jsd[h])})
            out.append({"position": pos, "layer": layer, "head": None, "n": n,
                        "attn_entropy_fp": float(ent_fp.mean()), "attn_entropy": float(ent_q.mean()),
                        "attn_jsd": float(jsd.mean()), "gate_sfr": M.sign_flip_rate(g_fp, g_q) * n,
                        "neuron_jaccard": M.topk_jaccard(g_fp, g_q, top_fraction) * n,
                        "mlp_cosine": M.mean_cosine(o_fp, o_q) * n})
    return out


SUMMED = ("attn_entropy_fp", "attn_entropy", "attn_jsd", "gate_sfr", "neuron_jaccard", "mlp_cosine")


def check(positions: Sequence[str], top_fraction: float) -> list[str]:
    """Raise on options the component comparison cannot run with; the positions, checked."""
    positions = P.check(positions)
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    return positions


def run_components(model: nn.Module, facts: list[Fact], specs: list[QuantSpec | Width],
                   calib: torch.Tensor | None = None, positions: Sequence[str] = ("last_subject", "last"),
                   top_fraction: float = 0.01, batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """One row per (method, bits, position, layer, head) and per (method, bits, position, layer)
    with the metrics above averaged over the prompts' tokens. A full-precision spec compares the
    model with itself."""
    positions = check(positions, top_fraction)
    configs = check_configs(model, specs)
    tok = model.tokenizer
    n_layers = resolve(model).n_layers
    chunks = P.batches(prompt_table(facts, tok), facts, batch_size)
    windows = [attention_window(model, layer) for layer in range(n_layers)]
    rows = []
    for w in each_width(model, configs, calib, progress, desc="components"):
        sums: dict[tuple, dict] = defaultdict(lambda: defaultdict(float))
        for chunk in tqdm(chunks, desc=f"components {w.method} {w.bits}-bit", disable=not progress, leave=False):
            batch = P.encode(tok, chunk.prompt.tolist(), chunk.subject_end.tolist())
            tokens = _tokens(batch, positions)
            fp = collect(model, batch, WHAT, tokens=tokens)
            with w.applied(model):
                q = collect(model, batch, WHAT, tokens=tokens)
            for r in compare_batch(fp, q, batch, positions, windows, top_fraction):
                acc = sums[(r["position"], r["layer"], r["head"])]
                acc["n"] += r["n"]
                for k in SUMMED:
                    if k in r:
                        acc[k] += r[k]
        info = {"method": w.method, "bits": w.bits, "avg_bits": w.avg_bits}
        for (pos, layer, head), acc in sums.items():
            n = acc.pop("n")
            rows.append({**info, "position": pos, "layer": layer, "head": head, "n_tokens": int(n),
                         **{k: v / n for k, v in acc.items()}})
    cols = ["method", "bits", "avg_bits", "position", "layer", "head", "n_tokens", *SUMMED]
    out = pd.DataFrame(rows)[cols]
    out["head"] = out["head"].astype("Int64")
    return out


def save_components(rows: pd.DataFrame, out: str | Path, meta: dict, gated: bool = True, title: str = "") -> None:
    """Write ``components.json`` (meta, rows), ``components.csv`` and, per position kind,
    ``components_attention_<position>.png`` and ``components_mlp_<position>.png``."""
    prefix = f"{title}: " if title else ""
    figures = {}
    for pos in rows.position.unique():
        figures[f"components_attention_{pos}"] = attention_figure(
            rows, pos, f"{prefix}attention per layer and head, query at the {pos.replace('_', ' ')} token")
        figures[f"components_mlp_{pos}"] = mlp_figure(
            rows, pos, f"{prefix}MLP per layer, at the {pos.replace('_', ' ')} token", gated=gated)
    save_analysis(out, "components", meta, rows, figures=figures)


# The paper's words as numbers (shared/paper-notes.md, analysis 4): 2-bit attention entropy
# "above 0.8 in middle layers"; gate SFR "above 30% = severe"; top-1% Jaccard "about 0.1" and MLP
# cosine "about 0" at 2 bits (read here as within 0.1 of those values).
ENTROPY_HIGH = 0.8
SFR_SEVERE = 0.3
JACCARD_PAPER, COSINE_PAPER, ABOUT = 0.1, 0.0, 0.1


def findings(rows: pd.DataFrame, position: str, method: str) -> dict:
    """Per width of ``method``, the layer-averaged metrics at ``position`` and the paper's claims as
    booleans, keyed ``w<bits>_<name>`` (for the chapter's prose). Middle layers: the middle third."""
    d = rows[(rows.position == position) & rows["head"].isna() & (rows.method == method)]
    if d.empty:
        raise ValueError(f"no {method} rows at position {position!r}")
    n_layers = int(d.layer.max()) + 1
    middle = d.layer.between(n_layers // 3, 2 * n_layers // 3 - 1)
    out: dict = {"n_layers": n_layers, "n_tokens": int(d.n_tokens.iloc[0])}
    for b, g in d.groupby("bits", sort=False):
        key = f"w{b}"
        mid = g[middle.loc[g.index]]
        out["entropy_mid_fp"] = float(mid.attn_entropy_fp.mean())
        out[f"{key}_entropy_mid"] = float(mid.attn_entropy.mean())
        out[f"{key}_entropy_rise"] = out[f"{key}_entropy_mid"] - out["entropy_mid_fp"]
        out[f"{key}_entropy_above"] = bool(out[f"{key}_entropy_mid"] > ENTROPY_HIGH)
        out[f"{key}_jsd"] = float(g.attn_jsd.mean())
        out[f"{key}_sfr"] = float(g.gate_sfr.mean())
        out[f"{key}_sfr_max"] = float(g.gate_sfr.max())
        out[f"{key}_sfr_severe"] = bool(out[f"{key}_sfr"] > SFR_SEVERE)
        out[f"{key}_jaccard"] = float(g.neuron_jaccard.mean())
        out[f"{key}_jaccard_as_paper"] = bool(abs(out[f"{key}_jaccard"] - JACCARD_PAPER) <= ABOUT)
        out[f"{key}_cosine"] = float(g.mlp_cosine.mean())
        out[f"{key}_cosine_as_paper"] = bool(abs(out[f"{key}_cosine"] - COSINE_PAPER) <= ABOUT)
    return out
