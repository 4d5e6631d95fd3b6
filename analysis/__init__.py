"""Turns one forward pass into what the explorer draws, without layers × heads × N² matrices."""
from .budget import CPU_LIMITS, GPU_LIMITS, BudgetError, ComputeLimits, Deadline, check_cost
from .engine import DTYPES, Analysis, analyze
from .record import FUSIONS, AttentionRecord, LayerAttention, fuse_heads
from .rollout import rollout
from .stats import STAT_LABELS, HeadStatistics, head_statistics
from .summary import CLASS_TOKEN, MEAN_RECEIVED, Summary, summary_of

__all__ = ["CLASS_TOKEN", "CPU_LIMITS", "DTYPES", "FUSIONS", "GPU_LIMITS", "MEAN_RECEIVED", "STAT_LABELS", "Analysis",
           "AttentionRecord", "BudgetError", "ComputeLimits", "Deadline", "HeadStatistics", "LayerAttention", "Summary",
           "analyze", "check_cost", "fuse_heads", "head_statistics", "rollout", "summary_of"]
