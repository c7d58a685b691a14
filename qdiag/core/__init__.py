"""Floor 1, what everything stands on: where a model's components live (``arch``), loading a model
(``models``), ParaRel and WikiText-2 (``data``, ``probe``), the token positions analyses read
(``positions``), files written whole (``io``), the run store of shared work (``store``). Nothing
here knows about quantization."""
