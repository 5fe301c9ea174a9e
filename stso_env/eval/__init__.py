"""Evaluation library: statistics, figures and the markdown report of controller comparisons.

Used by ``agents.evaluate``; it works on plain result dicts and imports nothing from ``agents``.
"""

from stso_env.eval.stats import METRICS, mean_ci95, success_criteria, welch_test

__all__ = ["METRICS", "mean_ci95", "success_criteria", "welch_test"]
