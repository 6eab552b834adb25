"""Post-hoc analysis of training runs: weight-space comparisons of checkpoints (METHODS.md B.19, B.20)."""
