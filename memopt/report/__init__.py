"""Reports: the plan object (plan), Pareto sweeps (pareto), plots (plot) and memory_viz snapshots (memory_viz)."""
