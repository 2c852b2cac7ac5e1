"""What a person reads: the validation report and its charts, the search's candidate table,
and the model card written beside a quantized checkpoint."""
