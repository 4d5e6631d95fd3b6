"""Side-by-side time and peak memory of the analysis against a plain forward and transformers' eager attentions.

Each (variant, size) runs in a fresh process so its peak RSS is its own (CPU), or is read from
torch.cuda.max_memory_allocated (GPU). Prints a markdown table with the ratios.

    python benchmarks/bench_analysis.py                      # default model, 224 / 518 / 1022 px, plus 2044 px
    python benchmarks/bench_analysis.py --vit-h              # adds a ViT-H/14 (IDEFICS-sized, random weights) at 1022 px
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
                                  num_attention_heads=c.num_attention_heads, mlp_ratio=c.intermediate_size // c.hidden_size,
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
    image = load_image(str(Path(__file__).resolve().parents[1] / "assets" / "astronaut.png"))
    pixels, geometry = loaded.preprocessing(image, size)
    pixels = pixels.to(loaded.device)
    hf = to_transformers_dinov2(loaded) if variant == "d" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def once():
        with torch.inference_mode():
            if variant == "a":
                loaded.model(pixels, interpolate_pos_encoding=True)
            elif variant in ("b", "c"):
                result = analyze(loaded, image, size)
                if variant == "c":
                    result.rollout_map()
            else:
                dense_cls_and_rollout(hf(pixels, output_attentions=True).attentions)
        sync()

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline_gpu = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - baseline_gpu) / 2**20
    return {"variant": variant, "size": size, "tokens": geometry.grid_h * geometry.grid_w + 1,
            "seconds": min(times[1:] or times), "peak_extra_mb": peak_mb}


def rerender_timings(size: int, device: str) -> dict:
    """Milliseconds to redraw after the analysis exists: another layer, head, or clicked patch."""
    from analysis import analyze
    from explorer import views
    from model import load_model
    from model.preprocess import load_image
    loaded = load_model(None, device=device)
    image = load_image(str(Path(__file__).resolve().parents[1] / "assets" / "astronaut.png"))
    result = analyze(loaded, image, size)
    image = views.Scene.of(image)
    style = views.Style()
    cases = {
        "layer change (overlay + head grid)": lambda: views.cls_view(result, image, 7, "mean", style),
        "head change (overlay)": lambda: views.cls_view(result, image, 7, 3, style, with_grid=False),
        "clicked patch (row + overlay)": lambda: views.patch_view(result, image, 200, 300, 9, "mean", "row", style),
        "clicked patch (column + overlay)": lambda: views.patch_view(result, image, 250, 120, 9, 2, "column", style),
    }
    out = {}
    for name, fn in cases.items():
        fn()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        out[name] = (time.perf_counter() - start) / 5 * 1000
    return out


def spawn(device: str, *args: str) -> dict:
    cmd = [sys.executable, __file__, "--device", device, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 518, 1022])
    parser.add_argument("--large", type=int, default=2044, help="size run for ours only (0 to skip)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vit-h", action="store_true", help="also run a ViT-H/14 (IDEFICS sizes) at 1022 px")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "SIZE", "MODEL", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--rerender", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, size, model_kind, repeats = args.child
        print(json.dumps(run_variant(variant, int(size), model_kind, args.device, int(repeats))))
        return
    if args.rerender:
        print(json.dumps(rerender_timings(args.rerender, args.device)))
        return
    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}\n")
    print("| model | px | tokens | variant | seconds | peak extra MB | time / (a) | (d) peak / ours |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        rows = {v: spawn(args.device, "--child", v, str(size), "default", "2") for v in VARIANTS}
        for v, row in rows.items():
            ratio = row["seconds"] / rows["a"]["seconds"]
            ours_mb = row["peak_extra_mb"]
            mem = f"{rows['d']['peak_extra_mb'] / ours_mb:.1f}×" if v in "bc" and ours_mb >= 16 else "–"
            print(f"| DINOv2-S/14 | {size} | {row['tokens']} | ({v}) | {row['seconds']:.2f} | "
                  f"{ours_mb:.0f} | {ratio:.2f}× | {mem} |", flush=True)
        print(f"| | {size} | | (c) vs (d) speed-up | {rows['d']['seconds'] / rows['c']['seconds']:.2f}× | | | |")
    if args.large:
        row = spawn(args.device, "--child", "c", str(args.large), "default", "1")
        print(f"| DINOv2-S/14 | {args.large} | {row['tokens']} | (c) | {row['seconds']:.2f} | "
              f"{row['peak_extra_mb']:.0f} | | |", flush=True)
    if args.vit_h:
        for v in ("a", "c"):
            row = spawn(args.device, "--child", v, "1022", "vit-h", "1")
            print(f"| ViT-H/14 random | 1022 | {row['tokens']} | ({v}) | {row['seconds']:.2f} | "
                  f"{row['peak_extra_mb']:.0f} | | |", flush=True)
    rerender = spawn(args.device, "--rerender", "1022")
    print("\nre-render at 1022 px (ms): " + ", ".join(f"{k}: {v:.0f}" for k, v in rerender.items()))
    for v, text in VARIANTS.items():
        print(f"({v}) {text}")


if __name__ == "__main__":
    main()
