"""Branch simulation: proxy-scored plans verified in forks of the real run."""

from stso_env.branch.orchestrator import (
    NEUTRAL_PLAN,
    BranchConfig,
    BranchDecision,
    BranchOrchestrator,
    real_score,
    rise_start,
    rollout_fork,
    valid_actions,
    valid_plans,
)

__all__ = ["NEUTRAL_PLAN", "BranchConfig", "BranchDecision", "BranchOrchestrator", "real_score",
           "rise_start", "rollout_fork", "valid_actions", "valid_plans"]
