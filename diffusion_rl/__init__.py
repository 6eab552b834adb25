"""Diffusion alignment: PRDP, DDPO and RLG guidance. Not built yet (issue 5)."""
