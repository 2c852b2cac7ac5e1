"""The demo fixture: a small Llama trained on text that ships with Python."""
