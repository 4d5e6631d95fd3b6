"""The CUDA path: the memory-efficient kernel's log-sum-exp, the model and the analysis against the CPU in float32,
float16 and bfloat16. Runs wherever CUDA is present and skips elsewhere (the suite never needs a GPU).

Tolerances, relative to each quantity's peak: float32 1e-5 (attention rows; hidden states 1e-4, for TF32-free
matmuls in a different order), float16 5e-3, bfloat16 3e-2 (8 bits of mantissa)."""
import numpy as np
import pytest
import torch

from analysis import analyze
from explorer.cache import ByteCache
from model import LoadedModel
from server.model_store import ModelStore
from server.settings import Settings
from model.vision import attention_with_lse, chunked_attention_with_lse
from tests.helpers import random_image, tiny_loaded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = list(TOLERANCE)


def tiny_on_cuda() -> LoadedModel:
    loaded = tiny_loaded()
    return LoadedModel(loaded.model.cuda(), loaded.preprocessing, "tiny")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(autouse=True)
def exact_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("dtype", DTYPES)
def test_efficient_kernel_log_sum_exp(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 301, 32) for _ in range(3))  # a token count no block size divides
    reference_out, reference_lse = chunked_attention_with_lse(q, k, v, 32 ** -0.5)
    out, lse = attention_with_lse(*(t.cuda().to(dtype) for t in (q, k, v)), 32 ** -0.5)
    assert lse.dtype == torch.float32 and lse.shape == (1, 4, 301)
    assert relative(out, reference_out) < TOLERANCE[dtype]
    assert relative(lse, reference_lse) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_on_cuda_matches_the_cpu(dtype):
    cpu, gpu = tiny_loaded(), tiny_on_cuda()
    gpu.model.to(dtype)
    pixels, _ = cpu.preprocessing(random_image(45, 70), 64)
    with torch.no_grad():
        expected = cpu.model(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        got = gpu.model(pixels.cuda().to(dtype), output_hidden_states=True, interpolate_pos_encoding=True)
    tolerance = max(TOLERANCE[dtype], 1e-4)
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert relative(a, b) < tolerance


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_analysis_on_cuda_matches_the_cpu(dtype):
    image = random_image(45, 70)
    expected = analyze(tiny_loaded(), image, 64)
    store = ModelStore(ByteCache(2**30), Settings(), tiny_on_cuda(), device="cuda")
    got = analyze(store.get("default", dtype), image, 64, dtype)
    tolerance = TOLERANCE[getattr(torch, dtype)]
    assert relative(torch.from_numpy(got.cls_attention), torch.from_numpy(expected.cls_attention)) < tolerance
    assert relative(torch.from_numpy(got.rollout_map()), torch.from_numpy(expected.rollout_map())) < 3 * tolerance
    token = got.token_at(2, 5)
    assert np.abs(got.query_map(token, 1, "mean", "column") - expected.query_map(token, 1, "mean", "column")).max() \
        < tolerance * np.abs(expected.query_map(token, 1, "mean", "column")).max() * 3


def test_half_precision_on_cuda_leaves_the_float32_weights_bit_identical():
    store = ModelStore(ByteCache(2**30), Settings(), tiny_on_cuda(), device="cuda")
    base = store.get("default")
    before = {name: value.clone() for name, value in base.model.state_dict().items()}
    analyze(store.get("default", "float16"), random_image(40, 40), 64, "float16")
    for name, value in base.model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[name]), name
