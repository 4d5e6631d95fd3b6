"""Views of the hidden states: token norms with outliers flagged, PCA to RGB, cosine similarity."""
from __future__ import annotations

import torch

OUTLIER_ROBUST_Z = 6.0  # a token is an outlier when its norm is this many robust deviations above the median
OUTLIER_MIN_RATIO = 2.0  # ... and at least this many times the median norm


def token_norms(hidden_states: "tuple[torch.Tensor, ...]") -> torch.Tensor:
    """L2 norm of every token at every depth: layers + 1 of (N, D) → (layers + 1, N)."""
    return torch.stack([torch.linalg.vector_norm(h.float(), dim=-1) for h in hidden_states])


def norm_outliers(norms: torch.Tensor) -> torch.Tensor:
    """High-norm tokens ('Vision Transformers Need Registers'): far above the median by a robust z-score."""
    median = norms.median()
    mad = (norms - median).abs().median() * 1.4826
    robust_z = (norms - median) / mad.clamp_min(1e-6 * median.abs().clamp_min(1e-12))
    return (robust_z > OUTLIER_ROBUST_Z) & (norms > OUTLIER_MIN_RATIO * median)


def pca_rgb(features: torch.Tensor) -> torch.Tensor:
    """First three principal components of (N, D) features, each scaled to [0, 1] (1st–99th percentile): (N, 3).

    The sign of each component is fixed so that its largest-magnitude projection is positive.
    """
    x = features.float()
    x = x - x.mean(0, keepdim=True)
    covariance = x.T @ x / max(1, x.shape[0] - 1)
    _, vectors = torch.linalg.eigh(covariance.double())
    components = vectors[:, -3:].flip(-1).float()  # (D, 3), largest variance first
    projected = x @ components
    signs = torch.sign(projected.gather(0, projected.abs().argmax(0, keepdim=True)))
    projected = projected * torch.where(signs == 0, torch.ones_like(signs), signs)
    low = torch.quantile(projected, 0.01, dim=0)
    high = torch.quantile(projected, 0.99, dim=0)
    return ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)


def cosine_similarity(features: torch.Tensor, token: int) -> torch.Tensor:
    """Cosine similarity of every token's features to those of `token`: (N, D) → (N,)."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    return x @ x[token]
