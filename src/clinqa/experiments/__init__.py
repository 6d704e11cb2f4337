"""Experiments: folders of runs plus one summary table (compare, cross-specialty)."""
