"""The diagnosis: is a quantized model in Signal Degradation or Computation Collapse, with what
evidence, where does it start, and what can still be repaired.

- ``diagnose`` (``diagnose.py``): the entry point, returning a ``Diagnosis``;
- ``rule.py``: the decision rule, every threshold with its reason, in one place;
- ``probes.py``: the measurements, the reference's side computed once;
- ``perturb.py``: perturbations whose mode is known by construction (the ground truth);
- ``report.py``: the one-page report and its figures.
"""

from .diagnose import Diagnosis, diagnose

__all__ = ["Diagnosis", "diagnose"]
