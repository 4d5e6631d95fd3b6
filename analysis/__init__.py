"""Turns one forward pass into what the explorer draws, without layers × heads × N² matrices."""
from .engine import DTYPES, Analysis, analyze
from .record import FUSIONS, AttentionRecord, LayerAttention, fuse_heads
from .relevance import (METHODS, Explanation, Prediction, Target, TargetError, explain, parse_target,
                        predicted_saliency, predictions)
from .rollout import rollout
from .stats import STAT_LABELS, HeadStatistics, head_statistics
from .summary import CLASS_TOKEN, MEAN_RECEIVED, Summary, summary_of

__all__ = ["CLASS_TOKEN", "DTYPES", "FUSIONS", "MEAN_RECEIVED", "METHODS", "STAT_LABELS", "Analysis",
           "AttentionRecord", "Explanation", "HeadStatistics", "LayerAttention", "Prediction", "Summary", "Target",
           "TargetError", "analyze", "explain", "fuse_heads", "head_statistics", "parse_target", "predicted_saliency",
           "predictions", "rollout", "summary_of"]
