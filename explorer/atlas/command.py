"""`python -m explorer atlas SOURCE --out DIR`: the head statistics of every image of a folder or dataset.

    python -m explorer atlas photos/ --out atlas/ --resolution 518
    python -m explorer atlas photos/ --out atlas/ --engine ray --actors 4 --gpus-per-actor 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model import CheckpointError

from ..inputs import DEFAULT_RESOLUTION, STAT_MODES, UserError, check_resolution
from .build import DEFAULT_BATCH, build_atlas
from .engines import ENGINES, EngineError, RayOptions, import_ray
from .sources import SourceError, open_source
from .store import AtlasError, check_out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m explorer atlas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a folder of images (searched recursively), a `datasets` folder "
                                       "(save_to_disk) or a hub dataset id")
    parser.add_argument("--out", type=Path, required=True, help="the atlas folder (new, empty, or one to resume)")
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the embedded DINOv2 ViT-S/14)")
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="long side in px")
    parser.add_argument("--queries", choices=tuple(STAT_MODES), default="spread",
                        help="patch queries per layer: 512 spread over the grid, as the page, or all (exact)")
    parser.add_argument("--split", default="train", help="the dataset's split (datasets only)")
    parser.add_argument("--engine", choices=ENGINES, default="local", help="this process, or Ray actors")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="images per part file and per Ray batch")
    parser.add_argument("--device", default=None, help="the local engine's device (default: CUDA when available)")
    parser.add_argument("--actors", type=int, default=1, help="Ray: model copies running at once")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray: CPUs (torch threads) per actor")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="Ray: GPUs per actor (0: CPU)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Exit status: 0 when done, 1 when no image could be analysed, 2 for arguments refused before starting."""
    args = parse_args(argv)
    try:
        resolution = check_resolution(args.resolution)
        if args.batch < 1 or args.actors < 1 or args.cpus_per_actor <= 0 or args.gpus_per_actor < 0:
            raise UserError("--batch and --actors must be at least 1, --cpus-per-actor above 0, "
                            "--gpus-per-actor 0 or more.")
        check_out(args.out)
        if args.engine == "ray":
            import_ray()
        summary = build_atlas(open_source(args.source, args.split), args.out, args.model, resolution, args.queries,
                              args.engine, args.batch, args.device,
                              RayOptions(args.actors, args.cpus_per_actor, args.gpus_per_actor))
    except (UserError, SourceError, AtlasError, EngineError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{summary['images']} images in {args.out} ({len(summary['skipped'])} skipped)", file=sys.stderr)
    return 1 if summary["images"] == 0 else 0
