"""quantflow: full-precision checkpoint -> validated, quantized model served on vLLM."""

__version__ = "0.1.0"
