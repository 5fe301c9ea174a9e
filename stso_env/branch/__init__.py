"""Branch simulation: proxy-scored interventions verified in forks of the real run."""

from stso_env.branch.orchestrator import (
    BranchConfig,
    BranchDecision,
    BranchOrchestrator,
    real_score,
    rollout_fork,
    valid_actions,
)

__all__ = ["BranchConfig", "BranchDecision", "BranchOrchestrator", "real_score", "rollout_fork", "valid_actions"]
