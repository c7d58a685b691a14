"""qdiag: find out why a quantized LLM fails, and what can still be repaired.

Importing qdiag loads nothing heavy and changes no global state. The entry points users reach
for first are available here, loaded on first use:

    import qdiag
    exp = qdiag.prepare("smollm2-135m", known=400)   # 400 prompts the model answers right
    result = qdiag.diagnose(exp.model, exp.known, [qdiag.QuantSpec(4), qdiag.QuantSpec(2)])

The package is built in floors (see the README): ``qdiag.core`` (models, data), ``qdiag.quant``
(quantizers), ``qdiag.measure`` (running and reading a model), ``qdiag.analyses`` (the study's
seven analyses), ``qdiag.diagnosis`` (the verdict) and ``qdiag.book``.
"""

__version__ = "0.1.0"

_ENTRY_POINTS = {
    "diagnose": "qdiag.diagnosis",
    "Diagnosis": "qdiag.diagnosis",
    "QuantSpec": "qdiag.quant.quantize",
    "quantize_model": "qdiag.quant.quantizer",
    "load_model": "qdiag.core.models",
    "prepare": "qdiag.experiment",
}

__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        import importlib

        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'qdiag' has no attribute {name!r}")
