"""Reading trained SAEs and sweeps: convergence rules, Pareto verdicts, the synthetic signed-axis benchmark's data
and scores, and the feature browser's statistics and app."""
