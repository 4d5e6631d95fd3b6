"""Turns one forward pass into what the explorer draws, without layers × heads × N² matrices."""
from .budget import (
                        CPU_LIMITS,
                        GPU_LIMITS,
                        BudgetError,
                        ComputeLimits,
                        Deadline,
                        check_cost,
)
from .engine import DTYPES, Analysis, analyze
from .faithfulness import REMOVALS, Faithfulness, faithfulness
from .record import FUSIONS, AttentionRecord, LayerAttention, fuse_heads
from .relevance import (
                        METHODS,
                        Explanation,
                        Prediction,
                        Target,
                        TargetError,
                        explain,
                        parse_target,
                        predicted_saliency,
                        predictions,
)
from .rollout import rollout
from .stats import STAT_LABELS, HeadStatistics, head_statistics
from .summary import CLASS_TOKEN, MEAN_RECEIVED, Summary, summary_of
from .text import TextError, ZeroShot, similarity, zero_shot

__all__ = ["CLASS_TOKEN", "CPU_LIMITS", "DTYPES", "FUSIONS", "GPU_LIMITS", "MEAN_RECEIVED", "METHODS", "REMOVALS",
           "STAT_LABELS", "Analysis", "AttentionRecord", "BudgetError", "ComputeLimits", "Deadline", "Explanation",
           "Faithfulness", "HeadStatistics", "LayerAttention", "Prediction", "Summary", "Target", "TargetError",
           "TextError", "ZeroShot", "analyze", "check_cost", "explain", "faithfulness", "fuse_heads", "head_statistics",
           "parse_target", "predicted_saliency", "predictions", "rollout", "similarity", "summary_of", "zero_shot"]
