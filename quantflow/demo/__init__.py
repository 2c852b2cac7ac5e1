"""The demo: a small Llama trained on text that ships with Python, the small MoE and chat
checkpoints the tests build, and the quality table that runs every method on the demo model."""
