"""Layer-by-layer calibration: feed calibration text through the decoder one layer at a time,
collect each weight matrix's input second moment ``H = X^T X / n``, quantize, and pass the
quantized layer's output on as the next layer's input (as GPTQ does).

Only one decoder layer's activations for the calibration set are held at a time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.arch import resolve, unwrap, weight_matrix
from .gptq import gptq, release_graphs
from .hqq import without_calibration
from .moments import _accumulate
from .plan import Plan
from .quantize import QTensor
from .swap import QuantizedWeights, device_of, to_device


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int) -> tuple[list, list]:
    """Hidden states entering layer 0 per batch, and each layer's other call arguments per batch.

    Every layer's forward is replaced by a recorder that passes its input through, so the model
    computes embeddings, masks and rotary tables (which differ per layer for sliding-window
    families) without running any layer; the last recorder stops the forward.
    Returns ``(inputs[batch], calls[batch][layer] = (args, kwargs))``.
    """
    hf = unwrap(model)
    arch = resolve(hf)
    layers = [hf.get_submodule(p) for p in arch.layers]
    device = next(hf.parameters()).device
    inputs, calls = [], []
    for start in range(0, calib.shape[0], batch_size):
        batch_calls: list = []

        def recorder(i: int):
            def forward(hidden_states, *args, **kwargs):
                if i == 0:
                    inputs.append(hidden_states)
                batch_calls.append((args, kwargs))
                if i == len(layers) - 1:
                    raise _Stop
                return hidden_states

            return forward

        # accelerate (device_map) keeps its own forward on the instance: put back whatever was there
        saved = [layer.__dict__.get("forward") for layer in layers]
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        try:
            hf(input_ids=calib[start : start + batch_size].to(device), use_cache=False)
        except _Stop:
            pass
        finally:
            for layer, fwd in zip(layers, saved):
                if fwd is None:
                    del layer.forward
                else:
                    layer.forward = fwd
        calls.append(batch_calls)
    return inputs, calls


def _map_tensors(v, fn):
    """``fn`` applied to every tensor inside nested tuples, lists and dicts (call arguments)."""
    if isinstance(v, torch.Tensor):
        return fn(v)
    if isinstance(v, (tuple, list)):
        return type(v)(_map_tensors(t, fn) for t in v)
    if isinstance(v, dict):
        return {k: _map_tensors(t, fn) for k, t in v.items()}
    return v


def _cast(v, dtype: torch.dtype):
    # floating tensors (hidden states, additive masks, rotary tables) follow the calibration dtype
    return _map_tensors(v, lambda t: t.to(dtype) if t.is_floating_point() else t)


@contextmanager
def _layer_dtype(layer: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """Run one decoder layer in ``dtype`` inside the block: its parameters and buffers are cast
    copies of this layer only, the originals are put back (bit for bit) after it."""
    saved = []
    for t in list(layer.parameters()) + list(layer.buffers()):
        if t.is_floating_point() and t.dtype != dtype:
            saved.append((t, t.data))
            t.data = t.data.to(dtype)
    try:
        yield layer
    finally:
        for t, data in saved:
            t.data = data


def _run_layer(layer: nn.Module, x: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _input_groups(layer: nn.Module, names: dict[str, str], x: torch.Tensor, call: tuple) -> list[list[str]]:
    """Planned modules of one layer grouped by shared input (q/k/v, gate/up), in execution order."""
    seen: dict[int, list[str]] = {}
    alive = []  # hold the inputs so that no id is reused within the pass
    hooks = []
    for full, rel in names.items():
        def hook(mod, args, full=full):
            alive.append(args[0])
            seen.setdefault(id(args[0]), []).append(full)
        hooks.append(layer.get_submodule(rel).register_forward_pre_hook(hook))
    try:
        _run_layer(layer, x[:1], (call[0], _slice_kwargs(call[1], 1)))
    finally:
        for h in hooks:
            h.remove()
    return list(seen.values())


def _slice_kwargs(kwargs: dict, n: int) -> dict:
    # masks and other per-row tensors follow the batch; rotary tables (batch 1) do not need slicing
    return _map_tensors(kwargs, lambda t: t[:n] if t.dim() > 0 and t.shape[0] > n else t)


class _Replay:
    """Skip recomputing what a layer's later passes already know.

    In true-sequential order, once the attention's output matrix (o) has been calibrated its input
    no longer changes, so later passes over the layer need not recompute the attention: the block
    returns ``o(kept input)``; the same for the MLP and its down matrix in the output pass. The first
    batch of every skipped block runs for real and must give exactly the kept result, else the
    block is never skipped (a family whose block does more after its last matrix).
    """

    def __init__(self, hf: nn.Module, arch, li: int) -> None:
        self.hf = hf
        self.blocks = {arch.weights[li][t]: hf.get_submodule(path)
                       for t, path in (("o", arch.attn[li]), ("down", arch.mlp[li])) if t in arch.weights[li]}
        self.kept: dict[str, list] = {}
        self.batch = 0
        self._ok: dict[str, bool | None] = {}
        self._len: dict[str, int | None] = {}  # the block's tuple length (None: a bare tensor)

    def keep(self, name: str, x: torch.Tensor) -> None:
        if name in self.blocks:
            self.kept.setdefault(name, []).append(x)

    @contextmanager
    def skipping(self, n_batches: int) -> Iterator[None]:
        installed = []
        for name, xs in self.kept.items():
            if len(xs) != n_batches or self._ok.get(name) is False:
                continue
            block, last = self.blocks[name], self.hf.get_submodule(name)
            installed.append((block, block.__dict__.get("forward")))
            block.forward = self._forward(name, block.forward, last, xs)
        try:
            yield
        finally:
            for block, fwd in installed:
                if fwd is None:
                    del block.forward
                else:
                    block.forward = fwd

    def _forward(self, name: str, original, last: nn.Module, xs: list):
        def forward(*args, **kwargs):
            mine = last(xs[self.batch])
            if self._ok.get(name) is None:
                real = original(*args, **kwargs)
                first = real[0] if isinstance(real, tuple) else real
                self._ok[name] = torch.equal(first, mine)
                self._len[name] = len(real) if isinstance(real, tuple) else None
                return real
            if not self._ok[name]:
                return original(*args, **kwargs)
            n = self._len[name]
            return mine if n is None else (mine,) + (None,) * (n - 1)

        return forward


@torch.no_grad()
def sequential_quantize(model: nn.Module, plan: Plan, calib: torch.Tensor, *, damp: float = 0.01,
                        order: str = "group", true_sequential: bool = True, batch_size: int = 8,
                        calib_dtype: torch.dtype | None = None, progress: bool = True) -> dict[str, QTensor]:
    """Quantize every planned matrix layer by layer; GPTQ specs use the calibration inputs.

    Matrices that read the same input (q, k, v) share one ``H`` and are quantized as one stacked
    matrix, which gives the same codes as one at a time. With ``true_sequential`` each group
    sees the inputs produced by the already-quantized groups before it in the same layer.
    ``calib_dtype`` (say ``torch.bfloat16``) runs the calibration passes in that dtype, one layer
    cast at a time, as GPTQModel does on CPU; ``H`` is still summed in float32 and GPTQ still
    rounds the model's own weights. None runs them in the model's dtype.
    """
    hf = unwrap(model)
    arch = resolve(hf)
    inputs, calls = capture_layer_inputs(hf, calib, batch_size)
    if calib_dtype is not None:
        inputs, calls = _cast(inputs, calib_dtype), _cast(calls, calib_dtype)

    def in_calib_dtype(layer: nn.Module):
        return _layer_dtype(layer, calib_dtype) if calib_dtype is not None else nullcontext()

    tensors: dict[str, QTensor] = {}
    home: dict[str, torch.device | None] = {}
    layer_bar = tqdm(range(arch.n_layers), desc="quantize layers", disable=not progress, leave=False)
    for li in layer_bar:
        layer = hf.get_submodule(arch.layers[li])
        prefix = arch.layers[li] + "."
        names = {n: n[len(prefix):] for n in arch.linear_names([li]) if n in plan}
        if not names:
            continue
        with in_calib_dtype(layer):
            groups = _input_groups(layer, names, inputs[0], calls[0][li])
        stages = groups if true_sequential else [sum(groups, [])]
        replay = _Replay(hf, arch, li) if true_sequential else None
        for stage in stages:
            # earlier stages of this layer run quantized while this stage's inputs are collected
            done = QuantizedWeights(plan, {n: tensors[n] for n in names if n in tensors})
            with in_calib_dtype(layer), done.applied(hf, cache=True):
                H = _collect_hessians(layer, stage, names, groups, plan, inputs, [c[li] for c in calls], replay)
            for group in groups:
                todo = [n for n in group if n in stage]
                tensors.update(_quantize_group(hf, todo, plan, H.get(group[0]), damp, order))
        # the quantized layer's output is the next layer's input
        with in_calib_dtype(layer), QuantizedWeights(plan, {n: tensors[n] for n in names}).applied(hf, cache=True), \
                replay.skipping(len(inputs)) if replay else nullcontext():
            for b, x in enumerate(inputs):
                if replay:
                    replay.batch = b
                inputs[b] = _run_layer(layer, x, calls[b][li])
        for n in names:  # a finished layer's codes wait in host memory: the GPU holds one layer's work
            home[n] = device_of(tensors[n])
            if home[n] is not None and home[n].type != "cpu":
                tensors[n] = to_device(tensors[n], "cpu")
    release_graphs()
    return {n: to_device(t, home[n]) if home.get(n) is not None else t for n, t in tensors.items()}


def _collect_hessians(layer: nn.Module, stage: list[str], names: dict[str, str], groups: list[list[str]],
                      plan: Plan, inputs: list, calls: list, replay: _Replay | None = None) -> dict[str, torch.Tensor]:
    """Sum of ``x^T x`` over calibration tokens, divided by the token count, keyed by the first
    module of each input group that has a GPTQ spec in ``stage``.

    The layer's forward stops as soon as the last of those modules has seen its input: the
    first stage (q, k, v) then costs only the input norm, and no stage runs the down projection.
    With ``replay``, the stage's inputs are kept (they are final) and blocks already kept are skipped.
    """
    leaders = [g[0] for g in groups if any(n in stage and plan[n].method == "gptq" for n in g)]
    if not leaders:
        return {}
    H: dict[str, torch.Tensor] = {}
    count: dict[str, int] = defaultdict(int)
    hooks = []
    for lead in leaders:
        def hook(mod, args, lead=lead):
            _accumulate(H, count, lead, args[0])
            if replay is not None:
                replay.keep(lead, args[0])
            if lead == leaders[-1]:
                raise _Stop
        hooks.append(layer.get_submodule(names[lead]).register_forward_pre_hook(hook))
    try:
        with replay.skipping(len(inputs)) if replay is not None else nullcontext():
            for b, (x, call) in enumerate(zip(inputs, calls)):
                if replay is not None:
                    replay.batch = b
                try:
                    _run_layer(layer, x, call)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {k: v / count[k] for k, v in H.items()}


def _quantize_group(hf: nn.Module, names: list[str], plan: Plan, H: torch.Tensor | None, damp: float,
                    order: str) -> dict[str, QTensor]:
    out: dict[str, QTensor] = {}
    ws = {n: weight_matrix(hf.get_submodule(n)).detach() for n in names}
    free = [n for n in names if plan[n].method not in ("gptq", "awq")]
    for n in free:
        out[n] = without_calibration(ws[n], plan[n])
    # stack GPTQ matrices with an identical spec: rows are independent given H
    by_spec: dict = defaultdict(list)
    for n in names:
        if plan[n].method == "gptq":
            by_spec[plan[n]].append(n)
    for spec, group in by_spec.items():
        stacked = torch.cat([ws[n] for n in group], dim=0)
        q = gptq(stacked, H, spec, damp=damp, order=order)
        codes, row = q.int_codes(), 0
        for n in group:
            rows = ws[n].shape[0]
            out[n] = QTensor.from_codes(codes[row : row + rows], q.scale[row : row + rows],
                                        q.zero[row : row + rows], spec.bits, spec.group_size)
            row += rows
    return out
