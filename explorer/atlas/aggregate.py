"""Every statistic over the dataset, per layer × head: its mean over images and a 95 % t-interval of that mean.

The interval is Student's t-interval of the mean over the n images that were analysed:
    mean ± t(0.975; n − 1) · s / √n,   s² = Σ (x − mean)² / (n − 1)   (undefined, NaN, for n < 2).
The sums are merged part by part (Chan et al.'s pairwise update), so the statistics table is never read whole.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats as scipy_stats

import visualizer
from analysis import STAT_LABELS

from .store import AGGREGATE, FIGURE, IMAGES, STATISTICS, SUMMARY, part_paths, write_atomic, write_bytes_atomic

CONFIDENCE = 0.95
INTERVAL = ("95 % Student's t-interval of the mean over images: mean ± t(0.975; n − 1) · s / √n, with s the "
            "sample standard deviation (n − 1 in its denominator); NaN for fewer than 2 images")


@dataclass
class Moments:
    """Per (statistic, layer, head): how many images, their mean, and the sum of squared deviations from it."""

    count: np.ndarray  # (layers, heads)
    mean: np.ndarray  # (statistics, layers, heads)
    m2: np.ndarray  # (statistics, layers, heads)

    @classmethod
    def of_part(cls, table: pa.Table, layers: int, heads: int) -> "Moments":
        cell = table["layer"].to_numpy() * heads + table["head"].to_numpy()
        count = np.bincount(cell, minlength=layers * heads).astype(np.float64)
        values = np.stack([table[name].to_numpy().astype(np.float64) for name in STAT_LABELS])
        mean = np.stack([np.bincount(cell, v, layers * heads) for v in values]) / count  # every image fills each cell
        m2 = np.stack([np.bincount(cell, (v - m[cell]) ** 2, layers * heads) for v, m in zip(values, mean)])
        shape = (len(STAT_LABELS), layers, heads)
        return cls(count.reshape(layers, heads), mean.reshape(shape), m2.reshape(shape))

    def merged(self, other: "Moments") -> "Moments":
        """Both parts' images together (Chan, Golub & LeVeque 1979's pairwise update)."""
        count = self.count + other.count
        delta, share = other.mean - self.mean, other.count / count
        return Moments(count, self.mean + delta * share, self.m2 + other.m2 + delta ** 2 * self.count * share)

    def interval(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) of the t-interval of each mean (see the module's docstring)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            half = scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, self.count - 1) * np.sqrt(self.m2 / (self.count - 1)
                                                                                       / self.count)
        half = np.where(self.count >= 2, half, np.nan)
        return self.mean - half, self.mean + half


def moments(folder: Path, layers: int, heads: int) -> Moments | None:
    """The moments of every committed statistics part, merged one part at a time (None: no part yet)."""
    total = None
    for path in part_paths(folder / STATISTICS):
        part = Moments.of_part(pq.read_table(path), layers, heads)
        total = part if total is None else total.merged(part)
    return total


def aggregate_table(m: Moments) -> pa.Table:
    """Long form: one row per layer × head × statistic with n, mean, low and high."""
    low, high = m.interval()
    stat_count, layers, heads = m.mean.shape
    statistic, layer, head = np.meshgrid(np.arange(stat_count), np.arange(layers), np.arange(heads), indexing="ij")
    names = np.array(list(STAT_LABELS), dtype=object)
    return pa.table({"layer": layer.ravel().astype(np.int32), "head": head.ravel().astype(np.int32),
                     "statistic": pa.array(names[statistic.ravel()], pa.string()),
                     "n": np.broadcast_to(m.count, m.mean.shape).ravel().astype(np.int64),
                     "mean": m.mean.ravel(), "low": low.ravel(), "high": high.ravel()})


def write_aggregate(folder: Path, settings: dict, failures: list[tuple[str, str]], seconds: float) -> dict:
    """aggregate.parquet, fig. 7 over the dataset (mean_attention_distance.png) and summary.json; returns the summary.

    Without any analysed image only the summary is written (with its skipped images)."""
    m = moments(folder, settings["num_layers"], settings["num_heads"])
    images = 0 if m is None else int(m.count.max())
    summary = {"settings": settings, "images": images, "skipped": [{"image": n, "reason": r} for n, r in failures],
               "seconds": round(seconds, 3), "interval": INTERVAL,
               "files": {"statistics": f"{STATISTICS}/part-*.parquet", "images": f"{IMAGES}/part-*.parquet",
                         "aggregate": AGGREGATE, "figure": FIGURE}}
    if m is not None:
        low, high = m.interval()
        write_atomic(aggregate_table(m), folder / AGGREGATE)
        index = list(STAT_LABELS).index("mean_distance_px")
        figure = visualizer.depth_intervals(
            m.mean[index], low[index], high[index], "mean attention distance (pixels)",
            f"Mean attention distance per head against depth over {images} images: mean and 95 % t-interval "
            f"({settings['model']}, {settings['resolution']} px)")
        write_bytes_atomic(visualizer.png_bytes(figure), folder / FIGURE)
        summary["aggregate"] = {name: {"mean": m.mean[i], "low": low[i], "high": high[i]}
                                for i, name in enumerate(STAT_LABELS)}
    write_bytes_atomic(json.dumps(visualizer.jsonable(summary), indent=1).encode(), folder / SUMMARY)
    return summary
