"""Floor 1, what everything stands on: where a model's components live (``arch``), loading a model
(``models``), ParaRel and WikiText-2 (``data``, ``probe``), the token positions analyses read
(``positions``), the model and data an analysis starts from (``experiment``), files written whole
(``io``). Nothing here knows about quantization."""
