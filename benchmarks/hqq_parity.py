"""qdiag's HQQ against the ``hqq`` package (0.2.8, its default solver) on the default model's matrices,
and both against round to nearest: prints the largest difference between the two HQQs' weights and
the mean absolute weight error of each, per width and group size.

    pip install --no-deps hqq==0.2.8.post1 termcolor einops   # hqq's other requirements are qdiag's own
    python benchmarks/hqq_parity.py [--matrices 14]

Installed, ``hqq`` is imported by transformers itself (its cache module), so it is not a dependency.
"""

import argparse

import torch

from qdiag.core.arch import resolve, unwrap
from qdiag.core.models import load_model
from qdiag.quant.hqq import hqq
from qdiag.quant.quantize import QuantSpec, rtn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=14, help="decoder matrices, from the first layer on")
    args = parser.parse_args()
    model = load_model()
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as err:
        Quantizer = None
        print(f"hqq package not importable ({err}): comparing with round to nearest only")
    hf = unwrap(model)
    names = resolve(model).linear_names()[: args.matrices]
    print(f"{len(names)} matrices of the default model; mean |W - Q(W)| x 1e3")
    print("bits group  rtn-asym  rtn-sym    hqq  hqq-pkg  max|qdiag - pkg|  hqq/rtn-asym")
    for bits in (2, 3, 4):
        for g in (64, 128):
            err = {"rtn-asym": 0.0, "rtn-sym": 0.0, "hqq": 0.0, "pkg": float("nan")}
            diff = float("nan")
            if Quantizer is not None:
                err["pkg"], diff = 0.0, 0.0
            for n in names:
                w = hf.get_submodule(n).weight.detach().float()
                ours = hqq(w, QuantSpec(bits, g, False, "hqq")).dequantize()
                for key, q in (("rtn-asym", rtn(w, QuantSpec(bits, g, False)).dequantize()),
                               ("rtn-sym", rtn(w, QuantSpec(bits, g, True)).dequantize()), ("hqq", ours)):
                    err[key] += float((q - w).abs().mean()) / len(names)
                if Quantizer is not None:
                    wq, meta = Quantizer.quantize(w, nbits=bits, group_size=g, optimize=True, round_zero=False,
                                                  axis=1, bitpack=False, compute_dtype=torch.float32, device="cpu")
                    theirs = Quantizer.dequantize(wq, meta).reshape(w.shape)
                    err["pkg"] += float((theirs - w).abs().mean()) / len(names)
                    if w.shape[1] % g == 0:  # else the package's groups run across rows (576 = 4.5 x 128)
                        diff = max(diff, float((ours - theirs).abs().max()))
            print(f"{bits:4d} {g:5d} {err['rtn-asym'] * 1e3:9.3f} {err['rtn-sym'] * 1e3:8.3f} {err['hqq'] * 1e3:6.3f} "
                  f"{err['pkg'] * 1e3:8.3f} {diff:17.2e} {err['hqq'] / err['rtn-asym']:13.3f}")


if __name__ == "__main__":
    main()
