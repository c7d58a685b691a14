"""Floor 2, quantizers and formats: a spec and the min-max quantizer (``quantize``), GPTQ
(``gptq``, driven layer by layer by ``calibrate``), input moments (``moments``), AWQ and HQQ
(``awq``, ``hqq``), llama.cpp's types (``gguf``), plans of which matrix gets which spec (``plan``),
quantized weights swapped in and out (``swap``), the front door that quantizes a model and caches
the result (``quantizer``), existing checkpoints (``checkpoint``, ``packed``), low-rank error
compensation (``eora``), and repairs applied to a checkpoint (``remedy``)."""
