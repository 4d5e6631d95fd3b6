"""Command line: the maps, GIFs and .npz exports for an image or a folder of images, without the UI.

    python -m explorer photo.jpg --out maps/
    python -m explorer photos/ --resolution 1022 --layers 5 11 --head mean --rollout max --out maps/
    python -m explorer photo.jpg --explain top --method relevance grad_rollout --out maps/
    python -m explorer photo.jpg --explain class:3 --faithfulness pixels --out maps/   # which map to trust
    python -m explorer photo.jpg --model openai/clip-vit-base-patch32 --prompts "a photo of a cat" "a dog" \\
        --explain "text:a photo of a cat"          # zero_shot.json, and the prompt's relevance map
    python -m explorer atlas photos/ --out atlas/      # a dataset atlas: see explorer/atlas/command.py
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

import visualizer
from analysis import FUSIONS, METHODS, REMOVALS, TargetError, TextError, analyze, explain, faithfulness, zero_shot
from analysis.text import text_model
from model import CheckpointError, InvalidImageError, load_image, load_model

from . import drawing, exports
from .inputs import (DEFAULT_RESOLUTION, UserError, check_resolution, explain_target, head_choice, layer_index,
                     prompt_list)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
logger = logging.getLogger("vit-inspect")


def image_paths(source: Path) -> list[Path]:
    """The image itself, or the images directly inside a folder, sorted."""
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if source.is_file():
        return [source]
    raise FileNotFoundError(f"{source} does not exist")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m explorer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="an image, or a folder of images")
    parser.add_argument("--out", type=Path, default=Path("vit-inspect-out"), help="output folder")
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the embedded DINOv2 ViT-S/14)")
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="long side in px")
    parser.add_argument("--layers", type=int, nargs="*",
                        help="layers to draw (default: the last; -1 counts from the end)")
    parser.add_argument("--head", default="mean", help="head index or mean/max/min for the GIF")
    parser.add_argument("--rollout", choices=FUSIONS, default="mean", help="head fusion of the rollout")
    parser.add_argument("--cmap", default="inferno", choices=visualizer.available_colormaps())
    parser.add_argument("--no-gif", action="store_true", help="skip the layer animation")
    parser.add_argument("--explain", metavar="TARGET",
                        help="also explain an output: top, class:N, embedding, region, patch:X,Y (a pixel), or "
                             "text:PROMPT (an image-text model's similarity with the prompt)")
    parser.add_argument("--prompts", nargs="+", metavar="PROMPT",
                        help="an image-text model's (CLIP, SigLIP) zero-shot scores of these prompts: zero_shot.json")
    parser.add_argument("--method", nargs="+", choices=METHODS, default=["relevance"],
                        help="the explanation's methods (with --explain)")
    parser.add_argument("--faithfulness", metavar="REMOVAL", choices=REMOVALS,
                        help="also score every map of the target (--explain, default top) by perturbation, removing "
                             "patches by dropping their tokens (drop) or blacking their pixels (pixels)")
    return parser.parse_args(argv)


def explanations(loaded, analysis, scene: drawing.Scene, target: str, methods: list[str],
                 style: drawing.Style) -> dict[str, bytes]:
    """The map of each method for `target` as a PNG, and every map's numbers with what it explains as JSON."""
    files, numbers = {}, {}
    for method in methods:
        e = explain(loaded, analysis, explain_target(target, analysis), method)
        files[f"explain_{method}.png"] = visualizer.png_bytes(
            drawing.paint(scene.large, e.values, style, f"{method} · {e.description}"))
        numbers[method] = {"target": str(e.target), "explained": e.description, "map": e.values.round(7).tolist()}
    files["explain.json"] = json.dumps(numbers).encode()
    return files


def perturbation_files(loaded, analysis, scene: drawing.Scene, target: str, removal: str,
                       resolution: int) -> dict[str, bytes]:
    """The perturbation curves of every map for `target` as a plot and as JSON (as /faithfulness returns them)."""
    pixels = loaded.preprocessing(scene.image, resolution)[0] if removal == "pixels" else None
    result = faithfulness(loaded, analysis, explain_target(target, analysis), removal, pixels)
    return {"faithfulness.png": visualizer.png_bytes(drawing.faithfulness_plot(result)),
            "faithfulness.json": json.dumps(result.to_dict()).encode()}


def export_image(analysis, scene: drawing.Scene, folder: Path, layers: list[int], head, fusion: str,
                 style: drawing.Style, gif: bool) -> list[Path]:
    """Every file for one analysed image."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for layer in layers:
        files[f"cls_layer{layer:02d}_{head}.png"] = drawing.cls_view(analysis, scene.large, layer, head, style)
        files[f"cls_layer{layer:02d}_heads.png"] = drawing.head_grid(analysis, scene.thumb, layer, style, legend=True)
    files[f"rollout_{fusion}.png"] = drawing.rollout_view(analysis, scene.large, fusion, 0.0, style)
    data = {name: visualizer.png_bytes(image) for name, image in files.items()}
    if gif:
        data[f"cls_layers_{head}.gif"] = drawing.layer_animation(analysis, scene.page, "cls", head, style)
    data["analysis.npz"], data["analysis.json"] = exports.numbers(analysis, layers[-1], head,
                                                                  settings={"fusion": fusion})
    for name, content in data.items():
        (folder / name).write_bytes(content)
    return [folder / name for name in data]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["atlas"]:
        from .atlas.command import main as atlas_main  # pyarrow, and Ray if asked, only for the atlas
        return atlas_main(argv[1:])
    args = parse_args(argv)
    try:
        paths = image_paths(args.source)
        resolution = check_resolution(args.resolution)
        prompts = prompt_list("\n".join(args.prompts)) if args.prompts is not None else None
        loaded = load_model(args.model)
        if prompts is not None:
            text_model(loaded)
    except (FileNotFoundError, ValueError, CheckpointError, TextError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    style = drawing.Style(cmap=args.cmap)
    failures = 0
    for path in tqdm(paths, desc="images", unit="image"):
        try:
            scene = drawing.Scene.of(load_image(path, lambda message, name=path.name: tqdm.write(f"{name}: {message}")))
            analysis = analyze(loaded, scene.image, resolution, original_size=scene.original_size,
                               keep_outputs=bool(args.explain or args.faithfulness))
            head = head_choice(args.head, analysis.num_heads, FUSIONS)
            layers = [layer_index(layer, analysis.num_layers) for layer in (args.layers or [-1])]
            folder = args.out / exports.safe_stem(path.stem)
            export_image(analysis, scene, folder, layers, head, args.rollout, style, not args.no_gif)
            if args.explain:
                for name, content in explanations(loaded, analysis, scene, args.explain, args.method, style).items():
                    (folder / name).write_bytes(content)
            if args.faithfulness:
                files = perturbation_files(loaded, analysis, scene, args.explain or "top", args.faithfulness,
                                           resolution)
                for name, content in files.items():
                    (folder / name).write_bytes(content)
            if prompts is not None:
                (folder / "zero_shot.json").write_text(json.dumps(vars(zero_shot(loaded, analysis, prompts))))
        except (InvalidImageError, UserError, TargetError) as err:
            failures += 1
            tqdm.write(f"skipped {path.name}: {err}", file=sys.stderr)
    return 1 if failures == len(paths) and paths else 0
