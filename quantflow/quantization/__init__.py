"""Translation of quantflow's QuantConfig into llm-compressor recipes, and running them."""
