"""qdiag: find out why a quantized LLM fails, and what can still be repaired.

Importing qdiag loads nothing heavy and changes no global state; import the modules you need:
``qdiag.models`` (load), ``qdiag.quantize`` / ``qdiag.gptq`` / ``qdiag.plan`` / ``qdiag.swap``
(quantize), ``qdiag.data`` and ``qdiag.evaluate`` (measure), ``qdiag.cliff`` (the first analysis).
"""

__version__ = "0.1.0"
