"""Which map to trust, over a folder of images: per map the mean positive and negative perturbation areas (Chefer et
al. 2021; analysis/faithfulness.py) with their spread over images, and what one image's curves cost against a plain
forward of the same model on the same image, from one run.

    python benchmarks/faithfulness.py                          # the default model, the bundled examples, 518 px
    python benchmarks/faithfulness.py --images photos/ --removal drop pixels
    python benchmarks/faithfulness.py --model google/vit-base-patch16-224 --images imagenet-val/ --protocol imagenet

The default model is scored for its two outputs: its saliency decoder's own region ("region") and its class token's
final feature ("embedding"). Any other model is scored for its top output ("top": the top class of a classifier).
`--protocol imagenet` is the published setting: 224 px, pixels blacked, the top class; the score is the class's
softmax probability (the published tables also report the top-1 accuracy over the dataset's labels, which this
script does not read).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import analyze  # noqa: E402
from analysis.faithfulness import RANDOM, faithfulness, map_values, offered_maps  # noqa: E402
from analysis.relevance import resolve  # noqa: E402
from explorer.cli import image_paths  # noqa: E402
from model import load_image, load_model  # noqa: E402

EXAMPLES = ROOT / "assets"


@dataclass
class Cost:
    """One image's curves for one target and removal: seconds of each part, and a plain forward's."""

    image: str
    target: str
    removal: str
    tokens: int
    forward: float
    analysis: float
    maps: float
    curves: float

    @property
    def scoring(self) -> float:
        """What the page's button costs: the maps and the perturbed passes (the image is analysed already)."""
        return self.maps + self.curves

    def __str__(self) -> str:
        f = self.forward
        return (f"{self.image}: target {self.target}, {self.removal}, {self.tokens} tokens: maps and curves "
                f"{self.scoring:.1f} s = {self.scoring / f:.1f}× a plain forward ({f:.3f} s): maps "
                f"{self.maps / f:.1f}×, perturbed passes {self.curves / f:.1f}×; the analysis before them "
                f"{self.analysis / f:.1f}×")


def plain_forward_seconds(loaded, pixels: torch.Tensor, repeats: int = 3) -> float:
    with torch.inference_mode():
        loaded.model(pixels, interpolate_pos_encoding=True)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            loaded.model(pixels, interpolate_pos_encoding=True)
            times.append(time.perf_counter() - started)
    return min(times)


def score_image(loaded, path: Path, resolution: int, targets: list[str],
                removals: list[str]) -> tuple[dict, list[Cost]]:
    """{(target, removal): Faithfulness} for one image, and its cost lines: seconds and ratios to a plain forward."""
    image = load_image(path)
    pixels, _ = loaded.preprocessing(image, resolution)
    forward = plain_forward_seconds(loaded, pixels)
    results, costs = {}, []
    for removal in removals:
        for target in targets:
            started = time.perf_counter()
            analysis = analyze(loaded, image, resolution, statistics=False)  # fresh, as the page's: no map cached
            # (nor the attention outputs that /faithfulness's own analysis keeps for the maps' sweep)
            analysed = time.perf_counter()
            resolved = resolve(loaded, analysis, target)
            for name in offered_maps(analysis):  # computed here only to time them apart; `faithfulness` reuses them
                map_values(loaded, analysis, resolved, name, 0.0, None)
            mapped = time.perf_counter()
            results[(target, removal)] = faithfulness(loaded, analysis, target, removal, pixels if removal == "pixels"
                                                      else None)
            done = time.perf_counter()
            costs.append(Cost(path.name, target, removal, analysis.record.num_tokens, forward, analysed - started,
                              mapped - analysed, done - mapped))
    return results, costs


def table(per_image: list[dict], key: tuple[str, str]) -> str:
    """Markdown: per map the mean ± standard deviation over images of each area, best first by the positive test."""
    rows = {}
    for results in per_image:
        for name, curve in results[key].curves.items():
            rows.setdefault(name, []).append((curve.positive_auc, curve.negative_auc))
    title = f"target {key[0]}, removal {key[1]}, {len(per_image)} images"
    lines = [f"| map | positive AUC ↓ | negative AUC ↑ | ({title}) |", "|---|---|---|---|"]
    for name, areas in sorted(rows.items(), key=lambda item: np.mean([a for a, _ in item[1]])):
        values = np.array(areas)
        mean, spread = values.mean(0), values.std(0)
        note = "mean of random orders" if name == RANDOM else ""
        lines.append(f"| {name} | {mean[0]:.3f} ± {spread[0]:.3f} | {mean[1]:.3f} ± {spread[1]:.3f} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the embedded DINOv2 ViT-S/14)")
    parser.add_argument("--images", type=Path, nargs="*", default=[],
                        help="folders or images scored beside the bundled examples")
    parser.add_argument("--resolution", type=int, default=518)
    parser.add_argument("--removal", nargs="+", choices=("drop", "pixels"), default=["drop"])
    parser.add_argument("--targets", nargs="+", help="targets as /relevance names them (default: see above)")
    parser.add_argument("--protocol", choices=("imagenet",), help="the published setting (see above)")
    parser.add_argument("--no-examples", action="store_true", help="only the images given")
    args = parser.parse_args()
    if args.protocol == "imagenet":
        args.resolution, args.removal, args.targets = 224, ["pixels"], ["top"]
    loaded = load_model(args.model, device="cpu")
    targets = args.targets or (["region", "embedding"] if args.model is None else ["top"])
    paths = [] if args.no_examples else image_paths(EXAMPLES)
    for source in args.images:
        paths += image_paths(source)
    warm = analyze(loaded, load_image(paths[0]), 112)  # thread pools and kernels' one-time buffers
    faithfulness(loaded, warm, targets[0], "drop")
    per_image, costs = [], []
    for path in paths:
        results, cost = score_image(loaded, path, args.resolution, targets, args.removal)
        per_image.append(results)
        costs += cost
        for line in cost:
            print(line, flush=True)
    print(f"\n{loaded.name} at {args.resolution} px on {torch.get_num_threads()} threads\n")
    for target in targets:
        for removal in args.removal:
            print(table(per_image, (target, removal)) + "\n")
    for target in targets:
        for removal in args.removal:
            mine = [c for c in costs if (c.target, c.removal) == (target, removal)]
            ratios = [c.scoring / c.forward for c in mine]
            whole = [(c.analysis + c.scoring) / c.forward for c in mine]
            print(f"cost, target {target}, {removal}: maps and curves median {np.median(ratios):.1f}× a plain forward "
                  f"(min {min(ratios):.1f}×, max {max(ratios):.1f}×); with the analysis before them median "
                  f"{np.median(whole):.1f}× (max {max(whole):.1f}×)")


if __name__ == "__main__":
    main()
