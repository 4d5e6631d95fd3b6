"""Side-by-side time and peak memory of a relevance map (analysis/relevance.py) against a plain forward and the dense
method of the published code (every attention kept with its gradient), default model, one process per measurement.

Peak extra memory as in bench_analysis.py (`measure.PeakMeter`: the resident high-water mark above the resident set
after loading, reset through /proc). The dense method is our tower's eager path with output_attentions=True, each
attention's gradient retained, the target backpropagated, then R = Π (I + Ā) on full matrices; where it cannot be
run (it would need more memory than the machine has), its attentions and gradients alone, 2·L·heads·N²·4 bytes, are
printed as a lower bound of its peak.

    python benchmarks/bench_relevance.py                       # 224 / 518 / 1022 px, dense at 224 and 518, 2044 px
    python benchmarks/bench_relevance.py --dense-sizes 224 518 1022   # where the machine has ~20 GB free
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import PeakMeter  # noqa: E402  (after the path: it imports the analysis package)

IMAGE = ROOT / "assets" / "astronaut.png"
VARIANTS = {
    "a": "plain forward, fused attention",
    "r": "ours from the image, as /relevance: analyze (head statistics left for their first use, the attention outputs"
         " kept), then relevance of the default target ('top'); grad_rollout shares its sweep",
    "t": "ours on an image analysed already (the page's Explain tab after the upload, whose analysis keeps no attention"
         " outputs): relevance of 'top', grad_rollout sharing its sweep",
    "s": "ours, another target on the same analysis ('embedding'): one more sweep, the forward record reused",
    "d": "dense: eager attentions with retained gradients, backward, R = Π (I + Ā) on full N×N matrices",
}


def dense_relevance(loaded, pixels: torch.Tensor, geometry) -> torch.Tensor:
    """The published method on full matrices, for the same default target as ours ('top', see relevance.resolve)."""
    from analysis.relevance import predicted_region
    out = loaded.model(pixels, output_attentions=True, interpolate_pos_encoding=True)
    for a in out.attentions:
        a.retain_grad()
    tokens = out.last_hidden_state
    grid = tokens[:, 1:].transpose(1, 2).reshape(1, -1, geometry.grid_h, geometry.grid_w)
    saliency = loaded.head(grid, (geometry.input_h, geometry.input_w))[0]
    (saliency * predicted_region(saliency.detach())).sum().backward()
    n = tokens.shape[1]
    relevance = torch.eye(n)
    for a in out.attentions:
        relevance = relevance + (a.grad[0] * a[0].detach()).clamp(min=0).mean(0) @ relevance
    return relevance[1:].mean(0)  # the decoder reads every patch evenly


def run_variant(variant: str, size: int) -> dict:
    from analysis import analyze
    from analysis.relevance import explain
    from model import load_model
    from model.preprocess import load_image
    loaded = load_model(None, device="cpu")
    image = load_image(str(IMAGE))
    pixels, geometry = loaded.preprocessing(image, size)
    warm = analyze(loaded, image, 112)  # thread pools and kernels' one-time buffers, outside the measurement
    explain(loaded, warm, "top")
    analysis = analyze(loaded, image, size, statistics=False) if variant in "st" else None
    if variant == "s":
        explain(loaded, analysis, "top")
    meter = PeakMeter("cpu")
    meter.start()
    start = time.perf_counter()
    if variant == "a":
        with torch.inference_mode():
            loaded.model(pixels, interpolate_pos_encoding=True)
    elif variant == "r":
        analysis = analyze(loaded, image, size, statistics=False, keep_outputs=True)  # as /relevance: head statistics
        # on first use, the attention outputs kept for the sweep
        explain(loaded, analysis, "top", "relevance")
        explain(loaded, analysis, "top", "grad_rollout")
    elif variant == "t":
        explain(loaded, analysis, "top", "relevance")
        explain(loaded, analysis, "top", "grad_rollout")
    elif variant == "s":
        explain(loaded, analysis, "embedding", "relevance")
    else:
        dense_relevance(loaded, pixels, geometry)
    seconds = time.perf_counter() - start
    return {"variant": variant, "size": size, "tokens": 1 + geometry.grid_h * geometry.grid_w, "seconds": seconds,
            "peak_extra_mb": meter.peak_extra_mb()}


def spawn(variant: str, size: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", variant, str(size)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def dense_bound_mb(tokens: int) -> float:
    """The dense method's attentions and their gradients alone: 2·L·heads·N² fp32 (12 layers, 6 heads)."""
    return 2 * 12 * 6 * tokens ** 2 * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 518, 1022])
    parser.add_argument("--dense-sizes", type=int, nargs="*", default=[224, 518])
    parser.add_argument("--large", type=int, default=2044, help="size run for (r) only (0 to skip)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child[0], int(args.child[1]))))
        return
    print(f"torch threads: {torch.get_num_threads()}, load average at start: {os.getloadavg()[0]:.1f}; "
          "MB = 2^20 bytes\n")
    print("| px | tokens | variant | seconds | peak extra MB | time / (a) | dense peak / (r) |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes + ([args.large] if args.large else []):
        variants = "ar" if size == args.large else "arts" + ("d" if size in args.dense_sizes else "")
        rows = {v: spawn(v, size) for v in variants}
        dense = rows["d"]["peak_extra_mb"] if "d" in rows else None
        bound = dense_bound_mb(rows["a"]["tokens"])
        for v, row in rows.items():
            peak = row["peak_extra_mb"]
            ratio = f"{dense / peak:.1f}×" if dense else f"≥ {bound / peak:.1f}× (bound)"
            print(f"| {size} | {row['tokens']} | ({v}) | {row['seconds']:.2f} | {row['peak_extra_mb']:.0f} | "
                  f"{row['seconds'] / rows['a']['seconds']:.2f}× | {ratio if v == 'r' else ''} |", flush=True)
        if dense is None:
            print(f"| {size} | | (d) not run | | ≥ {bound:.0f} (its attentions and gradients alone) | | |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    for v, text in VARIANTS.items():
        print(f"({v}) {text}")


if __name__ == "__main__":
    main()
