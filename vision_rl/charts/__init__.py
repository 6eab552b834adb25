"""Chart-to-code RL: synthetic chart tasks, sandboxed rendering, MSRL rewards and ChartMimic metrics."""
