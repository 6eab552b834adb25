"""Diffusion tasks: prompt sets (with the fields rewards read) and the held-out metric."""
