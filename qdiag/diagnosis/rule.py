"""The decision rule, in one place.

Every probe is placed on one scale: its **position** between the reference (0) and a
non-functioning counterpart (1): ``position = (value - reference) / (null - reference)``. The
null is what the probe reads when the thing it looks at no longer works: analytic where it can be
(sign flips of unrelated signs: 0.5; top-neuron overlap of unrelated rankings: chance; cosine of
unrelated vectors: 0; an attention head that no longer focuses: uniform over its keys; principal
subspaces of unrelated data: k/d; recovery when nothing comes back: 0; an answer ranked by
chance: half the vocabulary) and measured otherwise (CKA of the reference against itself with
the tokens shuffled).

The modes are defined by mechanism (``shared/paper-notes.md``): in Signal Degradation every
component still computes what it computed in full precision; in Computation Collapse some
components stop working. So the verdict rests on the **local** probes: each layer's attention and
MLP run on the reference's own inputs, compared with the reference's (``probes.py``). A
component's position is that of its most broken aspect (attention: its pattern, JSD against the
reference's over JSD of the reference's against uniform; its output, one minus cosine. MLP: its
gates, sign flips over the 0.5 of unrelated signs; its output, one minus cosine); the **score**
is the largest over every layer and component, with a bootstrap interval over prompts.

- ``computation_collapse``: the score's interval lies at or above 0.5: some component computes
  something closer to what a dead component computes than to what it computed before.
- ``signal_degradation``: the interval lies below 0.5 and the output has lost at least a tenth
  of the reference's correct answers: damage without a broken component.
- ``intact``: below 0.5 and under a tenth of the answers lost.
- ``transitional``: the interval straddles 0.5; the data cannot say on which side it is.

The two thresholds are fixed by their meaning, not fitted: 0.5 is the midpoint between a working
and a dead component; a tenth is the conventional "no response" margin the causal chapter uses.
The other probes (the study's table) are reported beside the verdict with the mode each points
to under the same midpoint, and disagreements are listed, not resolved.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..measure import metrics as M
from ..measure.readout import TOP_K

MIDPOINT = 0.5
INTACT = 0.1
VERDICTS = ("intact", "signal_degradation", "transitional", "computation_collapse")
N_BOOT = 1000


def position(value: float, reference: float, null: float) -> float:
    """Where ``value`` lies from ``reference`` (0) to ``null`` (1); NaN when they coincide."""
    if not all(map(math.isfinite, (value, reference, null))) or null == reference:
        return float("nan")
    return (value - reference) / (null - reference)


def points_to(pos: float) -> str:
    """The mode a probe's position points to, under the same thresholds as the verdict."""
    if not math.isfinite(pos):
        return "n/a"
    if pos < INTACT:
        return "intact"
    return "signal_degradation" if pos < MIDPOINT else "computation_collapse"


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0)


def local_positions(m: dict, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per layer, the position of each local probe: ``{probe: (layers,)}``, or ``(resamples,
    layers)`` when ``idx (resamples, prompts)`` resamples the prompts. ``jaccard`` is reported but
    not part of the score (see ``component_positions``)."""
    def mean(key: str) -> np.ndarray:
        x = m[key]
        return x.mean(0) if idx is None else x[idx].mean(1)

    jsd, jsd_null = mean("local_jsd"), mean("local_jsd_null")
    with np.errstate(divide="ignore", invalid="ignore"):
        pattern = np.where(jsd_null > 0, jsd / jsd_null, np.nan)
    chance = M.chance_jaccard(m["d_mlp"], 0.01)
    return {"attention_pattern": pattern, "attention_output": 1 - mean("local_attn_cos"),
            "gate_signs": mean("local_sfr") / 0.5, "top_neurons": (1 - mean("local_jaccard")) / (1 - chance),
            "mlp_output": 1 - mean("local_mlp_cos")}


# A component works only while every aspect of what it computes is kept: its position is that of
# its most broken aspect. The top-1% neuron overlap is left out of the score: with a few dozen top
# neurons it moves under the smallest noise (it reads 0.1 of the way at 8 bits on tiny models).
COMPONENTS = {"attention": ("attention_pattern", "attention_output"), "mlp": ("gate_signs", "mlp_output")}


def component_positions(m: dict, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per layer, the local position of the attention and of the MLP (each clipped to [0, 1]):
    ``{component: (layers,)}``, or ``(resamples, layers)`` with ``idx``."""
    probes = local_positions(m, idx)
    return {c: np.fmax(*(_clip(probes[p]) for p in names)) for c, names in COMPONENTS.items()}


def score(m: dict, seed: int = 0) -> tuple[float, float, float]:
    """The largest local position over layers and components, with a 95% bootstrap interval over
    prompts."""
    pos = component_positions(m)
    value = float(max(np.nanmax(p) for p in pos.values()))
    n = m["local_sfr"].shape[0]
    idx = np.random.default_rng(seed).integers(0, n, (N_BOOT, n))
    boot = component_positions(m, idx)
    best = np.nanmax(np.stack([np.nanmax(p, 1) for p in boot.values()], 1), 1)
    return value, float(np.quantile(best, 0.025)), float(np.quantile(best, 0.975))


def damage(m: dict, seed: int = 0) -> tuple[float, float, float]:
    """The share of the reference's correct answers the configuration loses, with a 95% interval."""
    lost = 1 - m["correct"].astype(float)
    idx = np.random.default_rng(seed).integers(0, lost.size, (N_BOOT, lost.size))
    boot = lost[idx].mean(1)
    return float(lost.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def verdict(score_lo: float, score_hi: float, lost: float) -> str:
    """The rule of the module docstring."""
    if score_lo >= MIDPOINT:
        return "computation_collapse"
    if score_hi >= MIDPOINT:
        return "transitional"
    return "intact" if lost < INTACT else "signal_degradation"


def layer_table(m: dict) -> pd.DataFrame:
    """One row per (layer, component) with its local position."""
    pos = component_positions(m)
    return pd.DataFrame([{"layer": layer, "component": c, "position": float(p[layer])}
                         for c, p in pos.items() for layer in range(len(p))])


def first_domino(layers: pd.DataFrame) -> dict | None:
    """The earliest layer (and its component) whose local position reaches the midpoint; None when
    no component breaks."""
    broken = layers[layers.position >= MIDPOINT].sort_values(["layer", "position"], ascending=[True, False])
    if broken.empty:
        return None
    row = broken.iloc[0]
    return {"layer": int(row.layer), "component": str(row.component), "position": float(row.position)}


def remedy(verdict_: str, layers: pd.DataFrame, lens_peak: int | None, n_layers: int,
           quantized: bool, outside: list[str] = (), not_quantization: list[str] = ()) -> dict:
    """What the evidence suggests, as qdiag's own repairs (``actions``) and a sentence.
    ``outside``: tensors outside the decoder's matrices that the checkpoint changes (its embedding,
    head, norms; rounded in its format or not); ``not_quantization``: tensors the format check finds
    are not quantization damage.
    Where no decoder component has moved (every local position under a tenth of the way) while
    answers are lost, the damage is outside the decoder: the remedy names those tensors and gives
    no decoder-layer advice."""
    per_layer = layers.groupby("layer").position.max()
    broken = [int(i) for i in per_layer.index[per_layer >= MIDPOINT]]
    few = max(1, n_layers // 4)
    actions: list[dict] = []
    restore = list(dict.fromkeys([*not_quantization, *outside]))
    lead = ""
    if not_quantization:
        lead = (f"Not quantization damage: {_listed(not_quantization)} "
                f"{'differs' if len(not_quantization) == 1 else 'differ'} from the base far beyond "
                "the format's rounding; re-export from the base. ")
    if verdict_ == "intact":
        return {"actions": [], "text": lead + "Nothing to repair: the output keeps the reference's answers."}
    moved = float(per_layer.max()) if len(per_layer) else 0.0
    if verdict_ in ("signal_degradation", "transitional") and moved < INTACT and restore:
        actions.append({"repair": "restore", "tensors": restore})
        text = ("The decoder's components compute what the reference's do (the largest local position is "
                f"{moved:.2f}), yet answers are lost: the damage is outside the decoder's matrices, in "
                f"{_listed(restore)}, which the checkpoint changes"
                + (" beyond its format's rounding" if not_quantization else "")
                + ". Re-export those from the base (qdiag prescribe gives their formats); the decoder's layers "
                "need nothing.")
        return {"actions": actions, "text": text}
    if not_quantization:  # the decoder moved: only what is not rounding is restored before its repairs
        actions.append({"repair": "restore", "tensors": list(not_quantization)})
    if verdict_ in ("signal_degradation", "transitional"):
        worst = per_layer.sort_values(ascending=False)
        hot = [int(i) for i in worst.index[worst >= worst.iloc[0] / 2]][:few] if worst.iloc[0] >= INTACT else []
        if quantized:
            actions.append({"repair": "eora", "rank": 16})
            if hot:
                actions.append({"repair": "protect_layers", "layers": sorted(hot), "bits": 8})
        if lens_peak is not None and lens_peak < n_layers - 1:
            actions.append({"repair": "amplify", "layer": int(lens_peak)})
        text = ("Components still work; the error acts as noise. Training-free compensation should help: "
                + "; ".join(_describe(a) for a in actions) + ".") if actions else \
            "Components still work, but this configuration offers no training-free repair to try."
        if verdict_ == "transitional":
            text += " If these do not bring the answers back, add bits: the evidence is on the edge of collapse."
        return {"actions": actions, "text": lead + text}
    if quantized and len(broken) <= few:
        actions.append({"repair": "protect_layers", "layers": broken, "bits": 8})
        return {"actions": actions, "text": lead + f"No training-free compensation: components break in layers "
                f"{broken}. Adding bits there (structural) is the one repair to try; otherwise retrain."}
    return {"actions": actions, "text": lead + "No training-free repair: components break in "
            f"{len(broken)} of {n_layers} layers. Add bits or retrain (structural reconstruction)."}


def _listed(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _describe(a: dict) -> str:
    if a["repair"] == "restore":
        return f"re-export {_listed(a['tensors'])} from the base"
    if a["repair"] == "eora":
        return f"low-rank compensation of the quantization error (EoRA, rank {a['rank']})"
    if a["repair"] == "protect_layers":
        return f"keep layers {a['layers']} at {a['bits']} bits, where the error concentrates"
    return f"amplify the logit lens of layer {a['layer']}, where the answer peaks"


def evidence(m: dict, fidelity: dict | None) -> pd.DataFrame:
    """One row per probe: ``probe``, ``group``, ``value``, ``reference``, ``null``, ``position``,
    ``points_to`` (see the module docstring for each probe's reference and null)."""
    rows: list[dict] = []

    def add(probe: str, group: str, value: float, reference: float, null: float, note: str = "") -> None:
        pos = position(value, reference, null)
        rows.append({"probe": probe, "group": group, "value": value, "reference": reference, "null": null,
                     "position": pos, "points_to": points_to(min(max(pos, 0.0), 1.0) if math.isfinite(pos) else pos),
                     "note": note})

    n_layers = m["local_sfr"].shape[1]
    vocab = m["vocab"]
    add("answer retention", "output", float(m["correct"].mean()), 1.0, 0.0,
        "share of the reference's correct answers still given")
    rank = float(np.median(m["rank"]))
    rows.append({"probe": "answer rank", "group": "output", "value": rank, "reference": 1.0, "null": vocab / 2,
                 "position": math.log(rank) / math.log(vocab / 2), "note": f"median; top {TOP_K} = rank drop"})
    # the paper's words: no drop is intact; a drop, however small, is not
    rows[-1]["points_to"] = "intact" if rank == 1 else points_to(max(rows[-1]["position"], INTACT))
    if fidelity:
        add("KL from reference (text)", "output", fidelity["kl"], 0.0, fidelity["kl_null"], "nats per token")
        add("top-1 agreement (text)", "output", fidelity["top1_agreement"], 1.0, 1.0 / vocab)
    lens_q, lens_ref = m["lens_q"].mean(0), m["lens_ref"].mean(0)
    emergence = float(lens_q.max() / lens_ref.max()) if lens_ref.max() > 0 else float("nan")
    add("logit-lens emergence", "signal", emergence, 1.0, 0.0,
        f"peak answer probability over layers over the reference's (peak at layer {int(lens_q.argmax())})")
    if "patched" in m:
        p_ref, p_q = m["p_ref"], m["p_q"]
        # recovery means something only where something was lost: at least a tenth of the answer's
        # probability (else n/a)
        gap = p_ref.mean() - p_q.mean() if p_ref.mean() - p_q.mean() >= INTACT * p_ref.mean() else 0.0
        for j, pos in enumerate(("last_subject", "last")):
            patched = m["patched"][:, j].mean(-1)  # (layers,)
            upto = n_layers - 1 if pos == "last" else n_layers  # the last layer at the last token is the output
            rec = (patched[:upto] - p_q.mean()) / gap if gap > 1e-6 else np.full(upto, np.nan)
            add(f"patching sufficiency ({pos.replace('_', ' ')} token)", "signal",
                float(np.nanmax(rec)) if np.isfinite(rec).any() else float("nan"), 1.0, 0.0,
                "best layer's recovery of the lost answer probability")
        inj = float((m["injected"].mean() - p_q.mean()) / gap) if gap > 1e-6 else float("nan")
        add("clean-signal injection", "signal", inj, 1.0, 0.0, f"reference stream enters at layer {n_layers // 2}")
        eff = {k: 1 - m[k].mean(-1) / m[p].mean() for k, p in (("ablated_ref", "p_ref"), ("ablated_q", "p_q"))}
        a, b = eff["ablated_ref"].ravel(), eff["ablated_q"].ravel()
        r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
        add("dependency-profile correlation", "signal", r, 1.0, 0.0, "zero ablation of the residual stream")
    mid = slice(n_layers // 3, max(2 * n_layers // 3, n_layers // 3 + 1))
    ent, ent_ref = float(m["prop_entropy"][:, mid].mean()), float(m["prop_entropy_ref"][:, mid].mean())
    rows.append({"probe": "attention entropy (middle layers)", "group": "components", "value": ent,
                 "reference": ent_ref, "null": 1.0, "position": abs(ent - ent_ref) / (1 - ent_ref) if ent_ref < 1
                 else float("nan"), "note": "normalized; 1 = uniform"})
    rows[-1]["points_to"] = points_to(rows[-1]["position"])
    add("attention JSD", "components", float(m["prop_jsd"].mean()), 0.0, float(m["prop_jsd_null"].mean()),
        "null: the reference's attention against uniform")
    add("gate sign-flip rate", "components", float(m["prop_sfr"].mean()), 0.0, 0.5)
    add("top-1% neuron Jaccard", "components", float(m["prop_jaccard"].mean()), 1.0,
        M.chance_jaccard(m["d_mlp"], 0.01))
    add("MLP output cosine", "components", float(m["prop_mlp_cos"].mean()), 1.0, 0.0)
    add("CKA diagonal", "representations", m["cka"], 1.0, m["cka_null"], "null: tokens shuffled")
    add("subspace similarity", "representations", m["subspace"], 1.0, m["k_over_d"], "top-k principal directions")
    add("error alignment", "representations", m["alignment"], m["k_over_d"], 1.0,
        "reference: error spread evenly (k/d); null: error along the main features")
    names = {"attention_pattern": "attention pattern (JSD / JSD to uniform)",
             "attention_output": "attention output (1 - cosine)", "gate_signs": "gate signs (flip rate / 0.5)",
             "top_neurons": "top-1% neurons (not scored)", "mlp_output": "MLP output (1 - cosine)"}
    for probe, p in local_positions(m).items():
        if np.isnan(p).all():
            continue
        worst = int(np.nanargmax(p))
        rows.append({"probe": f"local {names[probe]}", "group": "local", "value": float(p[worst]),
                     "reference": 0.0, "null": 1.0, "position": float(p[worst]),
                     "points_to": points_to(min(float(p[worst]), 1.0)),
                     "note": f"worst layer {worst}, on the reference's input"})
    return pd.DataFrame(rows)
