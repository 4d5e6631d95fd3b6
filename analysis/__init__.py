"""Turns one forward pass into what the explorer draws, without layers × heads × N² matrices."""
from .engine import DTYPES, Analysis, analyze
from .record import FUSIONS, AttentionRecord, LayerAttention, fuse_heads
from .rollout import rollout
from .stats import STAT_LABELS, HeadStatistics, head_statistics
from .summary import CLASS_TOKEN, MEAN_RECEIVED, Summary, summary_of

__all__ = ["CLASS_TOKEN", "DTYPES", "FUSIONS", "MEAN_RECEIVED", "STAT_LABELS", "Analysis", "AttentionRecord",
           "HeadStatistics", "LayerAttention", "Summary", "analyze", "fuse_heads", "head_statistics", "rollout",
           "summary_of"]
