"""A llama.cpp prescription against the obvious alternatives at the same bytes, each re-measured.

    rows = alternatives(model, p, start, float_file, folder, tools, calib)
    table = measure(model, rows, facts, text, window)

For each file llama.cpp offers one size up from the user's (``pure-Q3_K``: ``llama-quantize --pure
Q3_K``, one more bit on every matrix; ``Q3_K_M`` / ``Q4_K_M``: llama.cpp's own mixtures, which
already protect attn_v and ffn_down), at that file's bytes:

- ``comparator``: that file, as llama-quantize writes it from the float file;
- ``prescription``: the prescription's allocation at those bytes, written by llama-quantize with the
  command qdiag exports (the types it wrote are read back and must be the allocation's);
- ``random``: a random allocation of the same menu at the same bytes, with llama.cpp's quantizer
  in process (the bytes the command would write);
- ``eora``: the user's file with 16-bit rank-r factors on every decoder matrix, r the largest that
  fits the same bytes.

Bytes are every tensor the prescription may change (the decoder's matrices, the token embedding, an
untied head); the norms are float32 in every file and left out.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import resolve, unwrap, weight_matrix
from ..core.data import Fact
from ..measure import evaluate as ev
from ..measure.widths import Width, checkpoint_width, output_fidelity
from ..quant import llama_cpp, remedy
from .prescribe import Prescription, prescribed_width

COMPARATORS = ("pure-Q3_K", "Q3_K_M", "Q4_K_M")


def llama_file(float_file: str | Path, kind: str, folder: str | Path, tools: Path) -> Path:
    """``llama-quantize`` of the float file to ``kind`` (``pure-T``: ``--pure T``) in ``folder``,
    made once (written whole or not at all)."""
    path = Path(folder) / f"{kind}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        pure = ["--pure"] if kind.startswith("pure-") else []
        llama_cpp.run(tools, "llama-quantize", [*pure, str(float_file), str(tmp), kind.removeprefix("pure-"), "2"])
        tmp.replace(path)
    return path


def adapter_bytes(model: nn.Module, rank: int) -> int:
    """Bytes of 16-bit rank-``rank`` factors on every decoder matrix."""
    hf = unwrap(model)
    return sum(2 * min(rank, *s) * sum(s) for s in
               (tuple(weight_matrix(hf.get_submodule(n)).shape) for n in resolve(model).linear_names()))


def alternatives(model: nn.Module, p: Prescription, start: Width, float_file: str | Path, folder: str | Path,
                 tools: Path, calib: torch.Tensor, comparators: tuple[str, ...] = COMPARATORS, random: int = 2,
                 eora: bool = True, progress: bool = True) -> list[dict]:
    """The rows of the module docstring (the user's file first), each
    ``{"group", "row", "width", "bytes", "budget"}`` plus what made it (``command``, ``seed``, ``rank``)."""
    if p.engine != "llama.cpp" or start.checkpoint is None or start.checkpoint.format != "gguf":
        raise ValueError("the comparison at equal bytes is for a llama.cpp prescription of a GGUF file")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start_bytes = p.bytes_in(p.file_allocation(start.checkpoint))
    rows = [{"group": Path(start.checkpoint.path).stem, "row": "file", "width": start, "bytes": start_bytes,
             "budget": start_bytes}]
    for comp in tqdm(comparators, desc="alternatives", disable=not progress, leave=False):
        cw = checkpoint_width(model, str(llama_file(float_file, comp, folder, tools)))
        budget = p.bytes_in(p.file_allocation(cw.checkpoint))
        rows.append({"group": comp, "row": "comparator", "width": cw, "bytes": budget, "budget": budget})
        alloc = p.reallocate(budget)
        out = folder / f"prescribed-at-{comp}.gguf"
        cmd = p.command(alloc, str(float_file), str(out.with_suffix(".part")))
        llama_cpp.run(tools, "llama-quantize", cmd[1:])
        out.with_suffix(".part").replace(out)
        pw = checkpoint_width(model, str(out))
        written = p.file_allocation(pw.checkpoint)
        wrong = [k for k in alloc if written[k] != alloc[k]]
        if wrong:
            raise RuntimeError(f"llama-quantize did not write the allocation: {wrong[:3]} (command: {' '.join(cmd)})")
        rows.append({"group": comp, "row": "prescription", "width": pw, "bytes": p.bytes_in(written),
                     "budget": budget, "command": " ".join(cmd).replace(str(out.with_suffix(".part")), out.name)})
        for seed in range(random):
            ra = p.reallocate(budget, "random", seed=seed)
            rows.append({"group": comp, "row": "random", "budget": budget, "bytes": p.bytes_in(ra), "seed": seed,
                         "width": prescribed_width(model, p, ra, tools=tools, label=f"random-{seed}")})
        rank = max(0, (budget - start_bytes) // adapter_bytes(model, 1))
        if eora and rank:
            qw, bits = remedy.correct(model, start.checkpoint, calib, [rank])[rank]
            ew = Width(f"{start.method}+eora{rank}", start.bits, None, None, bits, apply=qw.applied)
            rows.append({"group": comp, "row": "eora", "width": ew, "bytes": start_bytes + adapter_bytes(model, rank),
                         "budget": budget, "rank": rank})
    return rows


def measure(model: nn.Module, rows: list[dict], facts: list[Fact], text: torch.Tensor, window: int = 512,
            n_weights: int | None = None, progress: bool = True) -> pd.DataFrame:
    """One line per row: bytes (and their ratio to the group's budget), bits per weight (over
    ``n_weights``, the prescription's tensors), KL to the reference and top-1 agreement on ``text``,
    and the share of the reference's right answers on ``facts`` lost, with a 95% bootstrap interval."""
    tok = model.tokenizer
    table = ev.prompt_table(facts, tok)
    ref = ev.score_prompts(model, tok, table)
    right = table[ref.correct.to_numpy()]
    if right.empty:
        raise ValueError("the reference answers none of these prompts: nothing to lose")
    out = []
    for r in tqdm(rows, desc="re-measure", disable=not progress, leave=False):
        w = r["width"]
        with w.applied(model):
            scored = ev.score_prompts(model, tok, right)
        lost = 1 - scored.correct.to_numpy(dtype=float)
        lo, hi = ev.bootstrap_ci(lost)
        fid = output_fidelity(model, text, w, window)
        line = {k: v for k, v in r.items() if k != "width"}
        line.update(method=w.method, bytes_ratio=r["bytes"] / r["budget"],
                    bpw=8 * r["bytes"] / n_weights if n_weights else float("nan"), kl=fid["kl"],
                    top1_agreement=fid["top1_agreement"], lost=float(lost.mean()), lost_lo=lo, lost_hi=hi,
                    n_prompts=len(right))
        out.append(line)
    return pd.DataFrame(out)


def verdict_text(table: pd.DataFrame) -> str:
    """Where the prescription beats each alternative at equal bytes and where it does not, in KL and
    in answers lost (a difference in answers only where the intervals do not overlap), in sentences."""
    lines = []
    for group, g in table[table.row != "file"].groupby("group", sort=False):
        pr = g[g.row == "prescription"]
        if pr.empty:
            continue
        pr = pr.iloc[0]
        for _, o in g[g.row != "prescription"].iterrows():
            if o.row == "random":
                name = f"a random allocation (seed {int(o.seed)})"
            elif o.row == "eora":
                name = f"EoRA rank {int(o['rank'])} on the file"
            else:
                name = group
            kl = "lower" if pr.kl < o.kl else "higher"
            if pr.lost_hi < o.lost_lo:
                ans = "loses fewer answers (intervals apart)"
            elif pr.lost_lo > o.lost_hi:
                ans = "loses more answers (intervals apart)"
            else:
                ans = f"loses {pr.lost:.0%} against {o.lost:.0%}, intervals overlapping"
            lines.append(f"At {group}'s bytes, against {name}: KL {kl} ({pr.kl:.4f} vs {o.kl:.4f}); {ans}.")
    return "\n".join(lines)
