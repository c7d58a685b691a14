"""Input second moments ``X^T X / n`` of weight matrices over calibration tokens, from passes of the
model as it runs: what AWQ's scale search and EoRA's weighting read (GPTQ's layer-by-layer driver in
``calibrate`` sums the same moments with ``_accumulate``)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn

from ..core.arch import unwrap, weight_matrix


class _Stop(Exception):
    pass


def _accumulate(H: dict, count: dict, key: str, x: torch.Tensor) -> None:
    """Add one batch of a module's inputs to ``H[key] = sum x^T x`` (float32) and its token count."""
    x = x.reshape(-1, x.shape[-1]).float()
    xx = _gram(x)
    H[key] = H[key] + xx if key in H else xx
    count[key] += x.shape[0]


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` for ``x (n, d)``; for wide ``x`` from three of its four column blocks (it is
    symmetric), a quarter fewer multiplications than one product."""
    d = x.shape[1]
    if d < 512:
        return x.t() @ x
    a, b = x[:, : d // 2], x[:, d // 2 :]
    ab = a.t() @ b
    return torch.cat((torch.cat((a.t() @ a, ab), 1), torch.cat((ab.t(), b.t() @ b), 1)), 0)


@torch.no_grad()
def input_moments(model: nn.Module, names: list[str], calib: torch.Tensor,
                  batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``X^T X / n`` of each named module's input over the calibration tokens, from one pass of the
    model as it runs (full precision unless quantized weights are applied). Modules that read the
    same input tensor (q / k / v, gate / up) get the same moment object, computed once. Each pass
    stops as soon as every named module has seen its input. Holds one ``(in, in)`` matrix per
    distinct input: pass a few layers' names at a time for a large model."""
    if calib is None or calib.numel() == 0:
        raise ValueError("input moments need calibration token ids; pass qdiag.data.calibration_tokens(...)")
    hf = unwrap(model)
    H: dict[str, torch.Tensor] = {}
    count: dict[str, int] = defaultdict(int)
    leader: dict[str, str] = {}  # a module -> the first module seen reading its input (itself if none)
    seen: dict[int, str] = {}  # id of an input tensor of this batch -> the first module that read it
    alive: list[torch.Tensor] = []  # this batch's inputs, held so that no id is reused within it
    done: set[str] = set()  # the modules that have seen this batch
    hooks = []
    for name in names:
        def hook(mod, args, name=name):
            x = args[0]
            if name not in leader:
                leader[name] = seen.setdefault(id(x), name)
                alive.append(x)
            if leader[name] == name:
                _accumulate(H, count, name, x)
            done.add(name)
            if len(done) == len(names):
                raise _Stop

        hooks.append(hf.get_submodule(name).register_forward_pre_hook(hook))
    device = next(hf.parameters()).device
    try:
        for start in range(0, calib.shape[0], batch_size):
            try:
                hf(input_ids=calib[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            seen.clear()
            alive.clear()
            done.clear()
    finally:
        for h in hooks:
            h.remove()
    moments = {k: (v / count[k]).cpu() for k, v in H.items()}
    return {name: moments[leader[name]] for name in names}


def moments_by_chunk(model: nn.Module, names_by_layer: list[list[str]], calib: torch.Tensor, batch_size: int = 8,
                     budget_bytes: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """``input_moments`` of every named matrix, a few layers at a time so that at most
    ``budget_bytes`` of ``(in, in)`` moments are held (default: a sixteenth of the model's weight
    bytes, at least 1 GiB); each chunk costs one calibration pass, up to its last layer. Yields one
    dict per chunk."""
    hf = unwrap(model)
    if budget_bytes is None:
        budget_bytes = max(sum(p.numel() * p.element_size() for p in hf.parameters()) // 16, 2**30)
    chunk: list[str] = []
    held = 0
    for names in names_by_layer:
        size = sum(weight_matrix(hf.get_submodule(n)).shape[1] ** 2 * 4 for n in names)
        if chunk and held + size > budget_bytes:
            yield input_moments(model, chunk, calib, batch_size)
            chunk, held = [], 0
        chunk += names
        held += size
    if chunk:
        yield input_moments(model, chunk, calib, batch_size)
