"""Side-by-side time and peak memory of the analysis against a plain forward and transformers' eager attentions.

Each (variant, size) runs in a fresh process; its peak extra memory is its resident set's high-water mark above
the resident set after loading (CPU, the mark reset through /proc), or torch.cuda.max_memory_allocated above the
memory allocated after loading (GPU). Prints markdown tables with the ratios, then every target of issue 11 with
its measured value.

    python benchmarks/bench_analysis.py                      # default model, 224 / 518 / 1022 px, 2044 px, served app
    python benchmarks/bench_analysis.py --vit-h              # adds a ViT-H/14 (IDEFICS-sized, random weights)
    python benchmarks/bench_analysis.py --vit-h --vit-h-sizes 1022 2044   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import PeakMeter  # noqa: E402  (after the path: it imports the analysis package)

IMAGE, WARMUP_IMAGE = ROOT / "assets" / "astronaut.png", ROOT / "assets" / "chelsea.png"
VARIANTS = {
    "a": "plain forward, fused attention, no attentions returned",
    "b": "ours: CLS maps + head statistics, every layer and head",
    "c": "ours: (b) + rollout",
    "d": "transformers Dinov2Model output_attentions=True (eager) + CLS maps + rollout from its matrices",
}
def load(model_kind: str, device: str):
    from model import IdeficsVisionConfig, IdeficsVisionTransformer, LoadedModel, Preprocessing, load_model
    if model_kind == "default":
        return load_model(None, device=device)
    torch.manual_seed(0)  # ViT-H/14 with the IDEFICS vision tower's sizes, random weights
    config = IdeficsVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=16, image_size=224, patch_size=14)
    model = IdeficsVisionTransformer(config).eval().to(device)
    return LoadedModel(model, Preprocessing(14), "ViT-H/14 (IDEFICS sizes, random weights)")


def to_transformers_dinov2(loaded):
    """Our default model in transformers' Dinov2Model, LayerScale set to 1 (ours has it folded in)."""
    from transformers import Dinov2Config, Dinov2Model
    c = loaded.config
    hf = Dinov2Model(Dinov2Config(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                                  num_attention_heads=c.num_attention_heads,
                                  mlp_ratio=c.intermediate_size // c.hidden_size,
                                  image_size=c.image_size, patch_size=c.patch_size, layer_norm_eps=c.layer_norm_eps,
                                  layerscale_value=1.0, attn_implementation="eager")).eval()
    ours = loaded.model.state_dict()
    state = hf.state_dict()
    state["embeddings.cls_token"] = ours["embeddings.class_embedding"].view(1, 1, -1)
    state["embeddings.position_embeddings"] = ours["embeddings.position_embedding.weight"].unsqueeze(0)
    for p in ("weight", "bias"):
        state[f"embeddings.patch_embeddings.projection.{p}"] = ours[f"embeddings.patch_embedding.{p}"]
        state[f"layernorm.{p}"] = ours[f"post_layernorm.{p}"]
        for i in range(c.num_hidden_layers):
            src, dst = f"encoder.layers.{i}.", f"encoder.layer.{i}."
            for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                         ("mlp.fc2", "mlp.fc2"), ("self_attn.q_proj", "attention.q_proj"),
                         ("self_attn.k_proj", "attention.k_proj"), ("self_attn.v_proj", "attention.v_proj"),
                         ("self_attn.out_proj", "attention.o_proj")):
                state[f"{dst}{b}.{p}"] = ours[f"{src}{a}.{p}"]
    hf.load_state_dict(state)
    return hf.to(loaded.device)


def dense_cls_and_rollout(attentions: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the anchors do with full matrices: CLS rows, and rollout (as a row vector, its cheapest form)."""
    cls = torch.stack([a[0, :, 0] for a in attentions])
    weights = torch.zeros(attentions[0].shape[-1], device=cls.device)
    weights[0] = 1.0
    for a in reversed(attentions):
        fused = a[0].mean(0)
        fused.diagonal().add_(1.0)
        weights = weights @ (fused / fused.sum(-1, keepdim=True))
    return cls, weights


def run_variant(variant: str, size: int, model_kind: str, device: str, repeats: int) -> dict:
    from analysis import analyze
    from model.preprocess import load_image
    loaded = load(model_kind, device)
    image = load_image(str(IMAGE))
    pixels, geometry = loaded.preprocessing(image, size)
    pixels = pixels.to(loaded.device)
    hf = to_transformers_dinov2(loaded) if variant == "d" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kept = []

    def once():
        with torch.inference_mode():
            if variant == "a":
                loaded.model(pixels, interpolate_pos_encoding=True)
            elif variant in ("b", "c"):
                result = analyze(loaded, image, size)
                if variant == "c":
                    result.rollout_map()
                kept.append(result.nbytes)
            else:
                dense_cls_and_rollout(hf(pixels, output_attentions=True).attentions)
        sync()

    meter = PeakMeter(device)
    meter.start()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "size": size, "tokens": geometry.grid_h * geometry.grid_w + 1,
            "seconds": min(times[1:] or times), "peak_extra_mb": meter.peak_extra_mb(),
            "kept_mb": kept[-1] / 2**20 if kept else None}


def rerender_timings(size: int, device: str) -> dict:
    """Milliseconds to redraw after the analysis exists, as the page draws (640 px, with colour bars): another
    layer, head, or clicked patch (median of 7)."""
    from analysis import analyze
    from explorer import drawing
    from explorer.cache import ByteCache
    from model import load_model
    from model.preprocess import load_image
    loaded = load_model(None, device=device)
    image = load_image(str(IMAGE))
    store = ByteCache(2**30)
    result = analyze(loaded, image, size, store=store)
    scene = drawing.Scene.of(image)
    style = drawing.Style()
    row, col, _ = drawing.patch_at(result, 200, 300)

    def click(layer: int, head: "int | str", direction: str, rebuilt: bool):
        def redraw():
            if not rebuilt:
                store.clear()
            drawing.patch_view(result, scene.page, row, col, layer, head, direction, style, legend=True)
        return redraw

    def layer_change():
        drawing.cls_view(result, scene.page, 7, "mean", style, legend=True, marker=(row, col))
        drawing.head_grid(result, scene.thumb, 7, style, legend=True)

    cases = {
        "layer change (overlay + head grid)": layer_change,
        "head change (overlay)": lambda: drawing.cls_view(result, scene.page, 7, 3, style, legend=True),
        "clicked patch, layer not yet rebuilt (row + overlay)": click(9, "mean", "row", rebuilt=False),
        "clicked patch, layer rebuilt (row + overlay)": click(9, "mean", "row", rebuilt=True),
        "clicked patch, layer rebuilt (column + overlay)": click(9, 2, "column", rebuilt=True),
    }
    out = {}
    for name, redraw in cases.items():
        redraw()
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            redraw()
            samples.append((time.perf_counter() - start) * 1000)
        out[name] = statistics.median(samples)
    return out


def spawn(device: str, *args: str) -> dict:
    cmd = [sys.executable, __file__, "--device", device, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table_line(model: str, row: dict, a_seconds: float | None = None, d_mb: float | None = None) -> str:
    ours_mb = row["peak_extra_mb"]
    ratio = f"{row['seconds'] / a_seconds:.2f}×" if a_seconds else ""
    mem = f"{d_mb / ours_mb:.1f}×" if d_mb and row["variant"] in "bc" and ours_mb >= 16 else "–"
    kept = f"{row['kept_mb']:.1f}" if row["kept_mb"] is not None else "–"
    return (f"| {model} | {row['size']} | {row['tokens']} | ({row['variant']}) | {row['seconds']:.2f} | "
            f"{ours_mb:.0f} | {kept} | {ratio} | {mem} |")


def targets(default: dict, large: dict | None, vit_h: dict, rerender: dict, served: dict | None) -> list[tuple]:
    """(target, measured, met) for every target of issue 11 that this run measured."""
    out = []
    if 1022 in default:
        rows = default[1022]
        eager = rows["d"]["peak_extra_mb"]
        for v in "bc":
            ratio = eager / rows[v]["peak_extra_mb"]
            out.append((f"1022 px ({v}): eager peak / ours ≥ 30×", f"{ratio:.1f}×", ratio >= 30))
        if served is not None:
            ratio = eager / served["peak_extra_mb"]
            out.append(("1022 px, served app (/cls_attention + /rollout): eager peak / ours ≥ 30×",
                        f"{ratio:.1f}× ({served['peak_extra_mb']:.0f} MB)", ratio >= 30))
        out.append(("1022 px: bytes kept per analysis ≤ 110 MB", f"{rows['b']['kept_mb']:.1f} MB",
                    rows["b"]["kept_mb"] <= 110))
        for v, bound in (("b", 1.3), ("c", 2.5)):
            ratio = rows[v]["seconds"] / rows["a"]["seconds"]
            out.append((f"1022 px: ({v}) time ≤ {bound}× (a)", f"{ratio:.2f}×", ratio <= bound))
    if large is not None and large["size"] == 2044:
        mb = large["peak_extra_mb"]
        out.append(("2044 px (c): peak extra < 1 GB", f"{mb:.0f} MB", mb < 1024))
    if 1022 in vit_h:
        mb = vit_h[1022]["c"]["peak_extra_mb"]
        out.append(("ViT-H/14 1022 px (c): peak extra < 1.5 GB", f"{mb:.0f} MB", mb < 1536))
    for name, bound in (("clicked patch, layer not yet rebuilt (row + overlay)", 60),
                        ("clicked patch, layer rebuilt (row + overlay)", 15),
                        ("layer change (overlay + head grid)", 20)):
        out.append((f"1022 px: {name} < {bound} ms", f"{rerender[name]:.0f} ms", rerender[name] < bound))
    return out


def flow_seconds(size: int, device: str) -> dict:
    """Seconds for attention flow (one max-flow per token) once the analysis exists, default model."""
    from analysis import analyze
    from model import load_model
    from model.preprocess import load_image
    result = analyze(load_model(None, device=device), load_image(str(IMAGE)), size)
    start = time.perf_counter()
    result.flow_map("mean")
    g = result.geometry
    return {"size": size, "tokens": g.grid_h * g.grid_w + result.num_prefix_tokens,
            "seconds": time.perf_counter() - start}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 518, 1022])
    parser.add_argument("--large", type=int, default=2044, help="size run for ours only (0 to skip)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vit-h", action="store_true", help="also run a ViT-H/14 (IDEFICS sizes), (a) and (c)")
    parser.add_argument("--vit-h-sizes", type=int, nargs="+", default=[1022])
    parser.add_argument("--no-served", action="store_true", help="skip the served app's measurement (CPU only)")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "SIZE", "MODEL", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--rerender", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--flow", type=int, metavar="SIZE", help="only time attention flow at SIZE px, and stop")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        variant, size, model_kind, repeats = args.child
        print(json.dumps(run_variant(variant, int(size), model_kind, args.device, int(repeats))))
        return
    if args.rerender:
        print(json.dumps(rerender_timings(args.rerender, args.device)))
        return
    if args.flow:
        print(json.dumps(flow_seconds(args.flow, args.device)))
        return
    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}; MB = 2^20 bytes\n")
    print("| model | px | tokens | variant | seconds | peak extra MB | kept MB | time / (a) | (d) peak / ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    default = {}
    for size in args.sizes:
        rows = default[size] = {v: spawn(args.device, "--child", v, str(size), "default", "2") for v in VARIANTS}
        for row in rows.values():
            print(table_line("DINOv2-S/14", row, rows["a"]["seconds"], rows["d"]["peak_extra_mb"]), flush=True)
        print(f"| | {size} | | (c) vs (d) speed-up | {rows['d']['seconds'] / rows['c']['seconds']:.2f}× | | | | |")
    large = spawn(args.device, "--child", "c", str(args.large), "default", "1") if args.large else None
    if large is not None:
        print(table_line("DINOv2-S/14", large), flush=True)
    vit_h = {}
    for size in args.vit_h_sizes if args.vit_h else []:
        rows = vit_h[size] = {v: spawn(args.device, "--child", v, str(size), "vit-h", "1") for v in "ac"}
        for row in rows.values():
            print(table_line("ViT-H/14 random", row, rows["a"]["seconds"]), flush=True)
    rerender = spawn(args.device, "--rerender", "1022")
    print("\nre-render at 1022 px (ms, median of 7): " + ", ".join(f"{k}: {v:.0f}" for k, v in rerender.items()))
    served = None
    if args.device == "cpu" and not args.no_served:
        from served_memory import served_peak_extra_mb
        served = served_peak_extra_mb(1022, IMAGE, WARMUP_IMAGE)
        print(f"served app, /cls_attention + /rollout at 1022 px: peak extra {served['peak_extra_mb']:.0f} MB "
              f"({served['seconds']:.1f} s)")
    for v, text in VARIANTS.items():
        print(f"({v}) {text}")
    print("\n| target | measured | met |\n|---|---|---|")
    for name, value, met in targets(default, large, vit_h, rerender, served):
        print(f"| {name} | {value} | {'yes' if met else 'NO'} |")


if __name__ == "__main__":
    main()
