"""Model evaluation shared by the baseline (stage 1) and validation (stage 4).

Both stages call the same functions with the same arguments, so a difference in the
numbers comes from the weights and nothing else.
"""
