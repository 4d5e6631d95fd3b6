"""Turns one forward pass into what the explorer draws, without layers × heads × N² matrices."""
from .engine import DTYPES, Analysis, analyze
from .record import FUSIONS, AttentionRecord, LayerAttention, fuse_heads
from .rollout import rollout
from .stats import STAT_LABELS, HeadStatistics, head_statistics

__all__ = ["DTYPES", "FUSIONS", "STAT_LABELS", "Analysis", "AttentionRecord", "HeadStatistics", "LayerAttention",
           "analyze", "fuse_heads", "head_statistics", "rollout"]
