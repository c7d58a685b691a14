"""Floor 2, quantizers and formats: a spec and the min-max quantizer (``quantize``), GPTQ
(``gptq``, driven layer by layer by ``calibrate``), plans of which matrix gets which spec
(``plan``), quantized weights swapped in and out (``swap``), the front door that quantizes a
model and caches the result (``quantizer``), and low-rank error compensation (``eora``)."""
