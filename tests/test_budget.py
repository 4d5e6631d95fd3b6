"""Compute limits per analysis: tokens and work refused from the geometry before any pixel is resized, with the
largest resolution that fits; a deadline that stops the forward between layers and the sweeps."""
import pytest
from PIL import Image

from analysis import CPU_LIMITS, GPU_LIMITS, BudgetError, ComputeLimits, Deadline, analyze, check_cost
from analysis.budget import cost
from model import IdeficsVisionConfig, Preprocessing
from tests.helpers import random_image, tiny_loaded

DINOV2_S = IdeficsVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                               patch_size=14)
VIT_H = IdeficsVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                            patch_size=14)


def geometry(config: IdeficsVisionConfig, side: int, height: int = 1000, width: int = 1000):
    return Preprocessing(config.patch_size).geometry(height, width, side)


def test_a_two_pixel_patch_model_at_2048_px_is_refused_before_any_resize(monkeypatch):
    """The issue's 269 kB hub model: 1,048,577 tokens at 2048 px held the only slot for over 1,000 s."""
    loaded = tiny_loaded(patch_size=2)
    image = random_image(512, 512)

    def resize(*args, **kwargs):
        raise AssertionError("resized before the cost was checked")
    monkeypatch.setattr(Image.Image, "resize", resize)
    with pytest.raises(BudgetError) as refused:
        analyze(loaded, image, 2048, limits=CPU_LIMITS)
    assert str(refused.value) == ("At 2048×2048 px this model sees 1,048,577 tokens, more than the 25,000 this "
                                  "server analyses at once: the largest resolution that fits for this image is 316.")
    fitting, above = geometry(loaded.config, 316, 512, 512), geometry(loaded.config, 318, 512, 512)
    assert cost(loaded.config, fitting)[0] == 24_965 and cost(loaded.config, above)[0] == 25_282


def test_defaults_admit_the_default_model_at_2044_px_and_vit_h_at_1022_px():
    check_cost(DINOV2_S, geometry(DINOV2_S, 2044), CPU_LIMITS, Preprocessing(14))  # 21,317 tokens
    check_cost(VIT_H, geometry(VIT_H, 1022), CPU_LIMITS, Preprocessing(14))  # 5,330 tokens
    check_cost(VIT_H, geometry(VIT_H, 2044), GPU_LIMITS, Preprocessing(14))
    assert cost(DINOV2_S, geometry(DINOV2_S, 2044)) == (21_317, 12 * 21_317 ** 2 * 384)


def test_a_deep_wide_model_is_capped_by_work_sooner():
    """ViT-H/14 at 2044 px has fewer tokens than the cap (21,317) but 8.9 times the default model's work."""
    with pytest.raises(BudgetError, match=r"At 2044×2044 px this model sees 32 layers of width 1280 over 21,317 "
                                          r"tokens, more work than this server does in one analysis: the largest "
                                          r"resolution that fits for this image is 1232\."):
        check_cost(VIT_H, geometry(VIT_H, 2044), CPU_LIMITS, Preprocessing(14))
    check_cost(VIT_H, geometry(VIT_H, 1232), CPU_LIMITS, Preprocessing(14))  # 88² + 1 tokens; at 1246, 89² + 1
    with pytest.raises(BudgetError):
        check_cost(VIT_H, geometry(VIT_H, 1246), CPU_LIMITS, Preprocessing(14))
    tight = ComputeLimits(max_tokens=10, max_work=1e20)
    with pytest.raises(BudgetError, match="no resolution offered here fits for this model"):
        check_cost(VIT_H, geometry(VIT_H, 224), tight, Preprocessing(14))


def test_a_deadline_stops_the_analysis_and_the_sweeps_with_a_plain_message():
    loaded, image = tiny_loaded(), random_image(120, 160)
    with pytest.raises(BudgetError, match=r"^The analysis was stopped after 0 s, this server's limit for one "
                                          r"analysis: try a lower resolution\.$"):
        analyze(loaded, image, 224, deadline=Deadline(0))
    analysis = analyze(loaded, image, 224, limits=CPU_LIMITS)  # within the limits: runs as before
    seen = []
    analysis.rollout_map("mean", progress=Deadline(60).progress(seen.append))
    assert seen[-1] == 1.0
    with pytest.raises(BudgetError, match="stopped after 0 s"):
        analysis.rollout_map("max", progress=Deadline(0).progress())
