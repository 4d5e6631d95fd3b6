"""The analysis engine against dense references computed from full attention matrices."""
import numpy as np
import pytest
import torch

from analysis import analyze, head_statistics, rollout
from analysis.rollout import kth_smallest
from analysis.stats import patch_distances
from model.vision import attention_with_lse, chunked_attention_with_lse
from tests.helpers import dense_attentions, dense_flow, dense_rollout, random_image, tiny_config, tiny_loaded

TOL = 1e-5


@pytest.fixture(scope="module")
def case():
    loaded = tiny_loaded(num_register_tokens=0)
    image = random_image(45, 70)  # non-square: grid 5 × 8 at long side 64
    analysis = analyze(loaded, image, long_side=64, max_stat_queries=None)
    pixels, _ = loaded.preprocessing(image, 64)
    return loaded, analysis, dense_attentions(loaded, pixels)


def test_geometry_is_non_square(case):
    _, analysis, attentions = case
    assert (analysis.geometry.grid_h, analysis.geometry.grid_w) == (5, 8)
    assert attentions[0].shape == (4, 41, 41)


def test_cls_attention_matches_dense(case):
    _, analysis, attentions = case
    for layer, attention in enumerate(attentions):
        expected = attention[:, 0, 1:].reshape(4, 5, 8).numpy()
        np.testing.assert_allclose(analysis.cls_maps(layer), expected, atol=TOL)
        np.testing.assert_allclose(analysis.cls_map(layer, "max"), expected.max(0), atol=TOL)
        assert analysis.cls_attention[layer, :, 0] == pytest.approx(attention[:, 0, 0].numpy(), abs=TOL)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.9])
def test_rollout_matches_dense(case, fusion, discard_ratio):
    _, analysis, attentions = case
    for last_layer in (0, 2):
        expected = dense_rollout(attentions, fusion, discard_ratio, last_layer)
        got = rollout(analysis.record, fusion, discard_ratio, last_layer)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=TOL)
    np.testing.assert_allclose(analysis.rollout_map(fusion, discard_ratio),
                               expected[1:].reshape(5, 8).numpy(), atol=TOL)


@pytest.mark.parametrize("head", [0, 3, "mean", "max", "min"])
def test_query_rows_and_columns_match_dense(case, head):
    _, analysis, attentions = case
    fuse = {"mean": lambda a: a.mean(0), "max": lambda a: a.amax(0), "min": lambda a: a.amin(0)}
    for layer in range(3):
        for row, col in [(0, 0), (2, 5), (4, 7)]:
            token = analysis.token_at(row, col)
            dense = attentions[layer]
            rows = dense[:, token] if isinstance(head, str) else dense[head, token]
            cols = dense[:, :, token] if isinstance(head, str) else dense[head, :, token]
            if isinstance(head, str):
                rows, cols = fuse[head](rows), fuse[head](cols)
            np.testing.assert_allclose(analysis.query_map(token, layer, head, "row"),
                                       rows[1:].reshape(5, 8).numpy(), atol=TOL)
            np.testing.assert_allclose(analysis.query_map(token, layer, head, "column"),
                                       cols[1:].reshape(5, 8).numpy(), atol=TOL)


def dense_statistics(attentions, grid_w, num_prefix=1, patch_size=tiny_config().patch_size):
    layers, heads = len(attentions), attentions[0].shape[0]
    num_patches = attentions[0].shape[-1] - num_prefix
    rows = torch.arange(num_prefix, num_prefix + num_patches)
    distances = patch_distances(rows, num_prefix, grid_w, num_patches).double()
    out = {k: np.zeros((layers, heads)) for k in ("cls_entropy", "mean_entropy", "mean_distance", "cls_mass")}
    for layer, a in enumerate(attentions):
        a = a.double()
        entropy = -(a * torch.log(a.clamp_min(1e-300))).sum(-1)  # (heads, N)
        out["cls_entropy"][layer] = entropy[:, 0].numpy()
        out["mean_entropy"][layer] = entropy[:, num_prefix:].mean(-1).numpy()
        patch = a[:, num_prefix:, num_prefix:]
        out["mean_distance"][layer] = ((patch * distances).sum(-1) / patch.sum(-1)).mean(-1).numpy()
        out["cls_mass"][layer] = a[:, num_prefix:, 0].mean(-1).numpy()
    return out | dense_paper_statistics(attentions, grid_w, num_prefix, patch_size)


def dense_paper_statistics(attentions, grid_w, num_prefix, patch_size):
    """The definitions, written out on full matrices with plain loops.

    cls_patch_entropy: p_j = A[0, P + j] / Σ_k A[0, P + k] over the patches j (the map that is drawn);
        H = −Σ_j p_j ln p_j.
    mean_distance_px (Dosovitskiy et al. 2021, fig. 7): for every patch query i, Σ_j A[P + i, P + j] · d_ij over the
        patch keys j, the prefix keys' attention dropped and not renormalised, where d_ij is the Euclidean distance in
        pixels of the model input between the centres ((row + ½)·patch, (col + ½)·patch) of patches i and j; then
        the mean over every patch query i.
    """
    num_patches = attentions[0].shape[-1] - num_prefix
    centres = np.array([((r + 0.5) * patch_size, (c + 0.5) * patch_size)
                        for r, c in (divmod(j, grid_w) for j in range(num_patches))])
    pixel_distance = np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1))  # (patches, patches)
    layers, heads = len(attentions), attentions[0].shape[0]
    out = {k: np.zeros((layers, heads)) for k in ("cls_patch_entropy", "mean_distance_px")}
    for layer, a in enumerate(attentions):
        a = a.double().numpy()
        for head in range(heads):
            p = a[head, 0, num_prefix:] / a[head, 0, num_prefix:].sum()
            out["cls_patch_entropy"][layer, head] = -sum(x * np.log(x) for x in p if x > 0)
            per_query = [sum(a[head, num_prefix + i, num_prefix + j] * pixel_distance[i, j] for j in range(num_patches))
                         for i in range(num_patches)]
            out["mean_distance_px"][layer, head] = np.mean(per_query)
    return out


def test_head_statistics_match_dense(case):
    _, analysis, attentions = case
    expected = dense_statistics(attentions, grid_w=8)
    assert analysis.statistics.num_queries == 40
    for name, values in analysis.statistics.as_dict().items():
        np.testing.assert_allclose(values, expected[name], atol=TOL, err_msg=name)


def test_statistics_left_for_their_first_use_match_dense(case):
    loaded, _, attentions = case
    deferred = analyze(loaded, random_image(45, 70), long_side=64, max_stat_queries=None, statistics=False)
    assert not any(key[0] == "statistics" for key in deferred._derived)  # the forward computed none
    expected = dense_statistics(attentions, grid_w=8)
    for name, values in deferred.statistics.as_dict().items():
        np.testing.assert_allclose(values, expected[name], atol=TOL, err_msg=name)


def test_sampled_statistics_use_spread_queries(case):
    _, analysis, attentions = case
    sampled = head_statistics(analysis.record, 1, 8, max_queries=10)
    assert sampled.num_queries == 10
    exact = analysis.statistics.mean_distance
    assert np.abs(sampled.mean_distance - exact).max() < 0.25 * exact.max()
    np.testing.assert_allclose(sampled.cls_entropy, analysis.statistics.cls_entropy, atol=TOL)


def test_kth_smallest_is_exact():
    torch.manual_seed(1)
    values = torch.rand(1000, 37) ** 3
    for k in (1, 17, 5000, 36999, 37000):
        blocks = lambda: iter(values.split(128))
        assert kth_smallest(blocks, k) == torch.kthvalue(values.flatten(), k).values.item()


def test_fused_lse_attention_matches_chunked_reference():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 3, 77, 16) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, 0.25)
    ref_out, ref_lse = chunked_attention_with_lse(q, k, v, 0.25)
    np.testing.assert_allclose(out.numpy(), ref_out.numpy(), atol=TOL)
    np.testing.assert_allclose(lse.numpy(), torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, -1).numpy(), atol=TOL)
    np.testing.assert_allclose(ref_lse.numpy(), lse.numpy(), atol=TOL)


def test_registers_are_prefix_tokens():
    loaded = tiny_loaded(num_register_tokens=2)
    with torch.no_grad():
        loaded.model.embeddings.register_tokens.normal_()
    analysis = analyze(loaded, random_image(40, 40), long_side=32)
    assert analysis.num_prefix_tokens == 3
    assert analysis.cls_maps(0).shape == (4, 4, 4)
    pixels, _ = loaded.preprocessing(random_image(40, 40), 32)
    dense = dense_attentions(loaded, pixels)
    np.testing.assert_allclose(analysis.cls_maps(1), dense[1][:, 0, 3:].reshape(4, 4, 4).numpy(), atol=TOL)


def test_hidden_state_views(case):
    loaded, analysis, _ = case
    norms, outliers = analysis.norm_map(1)
    assert norms.shape == outliers.shape == (5, 8)
    expected = analysis.hidden_states[2][1:].norm(dim=-1).reshape(5, 8).numpy()
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    rgb = analysis.pca_map(2)
    assert rgb.shape == (5, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1 and rgb.std() > 0.05
    token = analysis.token_at(3, 4)
    similarity = analysis.similarity_map(0, token)
    assert similarity[3, 4] == pytest.approx(1.0, abs=1e-5)
    assert similarity.max() <= 1 + 1e-5


def test_outlier_flags_planted_high_norm_token():
    from analysis.hidden import norm_outliers
    norms = torch.full((100,), 10.0) + torch.rand(100)
    norms[37] = 80.0
    flags = norm_outliers(norms)
    assert flags.nonzero().flatten().tolist() == [37]


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_attention_flow_matches_a_plain_max_flow(fusion):
    loaded = tiny_loaded()
    image = random_image(24, 32)  # grid 3 × 4 at long side 32: 13 tokens keep the reference quick
    analysis = analyze(loaded, image, long_side=32)
    pixels, _ = loaded.preprocessing(image, 32)
    expected = np.array(dense_flow(dense_attentions(loaded, pixels), fusion))
    got = analysis.flow_map(fusion)
    np.testing.assert_allclose(got, expected[1:].reshape(3, 4), atol=TOL)
    assert expected.max() > 0.05  # the maps carry real flow, not zeros


def test_attention_flow_refuses_large_token_counts(case):
    from analysis.flow import MAX_FLOW_TOKENS, check_flow_size
    check_flow_size(MAX_FLOW_TOKENS)
    with pytest.raises(ValueError, match="lower the resolution"):
        check_flow_size(MAX_FLOW_TOKENS + 1)


def test_rebuilt_layers_give_every_row_and_column_of_the_dense_attention(case):
    from explorer.cache import ByteCache
    _, analysis, attentions = case
    store = analysis.record.store = ByteCache(10**9)
    for layer, dense in enumerate(attentions):
        attention = analysis.record.layer(layer)  # rebuilt from hidden_states[layer] and the kept lse
        np.testing.assert_allclose(attention.probs(slice(None)).numpy(), dense.numpy(), atol=TOL)
        np.testing.assert_allclose(attention.column(7).numpy(), dense[:, :, 7].numpy(), atol=TOL)
    assert len(store) == 0  # sweeps do not fill the store; clicks do
    analysis.query_map(analysis.token_at(1, 1), 2, "mean")
    assert store.keys() == [("layer", analysis.record.serial, 2)]
    assert analysis.record.layer(2) is analysis.record.layer(2)


def test_an_analysis_keeps_layer_inputs_and_lse_and_counts_what_it_derives(case):
    loaded, image = case[0], random_image(45, 70)
    analysis = analyze(loaded, image, long_side=64)
    layers, heads, n, d = 3, 4, 41, 32
    assert analysis.record.layers is loaded.model.encoder.layers  # the module that ran, never a cast copy
    assert len(analysis.hidden_states) == layers + 1 and analysis.hidden_states[0].shape == (n, d)
    with torch.inference_mode():  # the copies the record keeps are the forward's hidden states, bit for bit
        forward = loaded.model(loaded.preprocessing(image, 64)[0], output_hidden_states=True,
                               interpolate_pos_encoding=True)
    for kept, expected in zip(analysis.hidden_states, forward.hidden_states, strict=True):
        assert torch.equal(kept, expected[0])
    inputs_and_lse = (layers + 1) * n * d * 4 + layers * heads * n * 4
    small = analysis.cls_attention.nbytes + analysis.token_norms.nbytes + analysis.statistics.nbytes + layers * d * 4
    assert analysis.record.outputs == [] and analysis.nbytes == inputs_and_lse + small  # outputs kept only if asked
    before = analysis.nbytes
    analysis.rollout_map("min", 0.25)
    assert analysis.nbytes == before + n * 4


@pytest.mark.parametrize("budget", [3 * 41 * 32 * 4 - 1, 3 * 41 * 32 * 4])
def test_heads_outputs_are_kept_only_within_their_budget(case, monkeypatch, budget):
    """Kept: every layer's O exactly (the kernel's, counted in nbytes, moved with the record); else none."""
    from analysis import record
    loaded, kept = case[0], budget == 3 * 41 * 32 * 4
    image = random_image(45, 70)
    monkeypatch.setattr(record, "KEEP_OUTPUTS_BYTES", budget)
    without = analyze(loaded, image, long_side=64)  # not asked for
    analysis = analyze(loaded, image, long_side=64, keep_outputs=True)
    outputs = analysis.record.outputs
    assert without.record.outputs == [] and len(outputs) == (3 if kept else 0)
    assert analysis.nbytes == without.nbytes + (3 * 41 * 32 * 4 if kept else 0)
    layer, x = loaded.model.encoder.layers[1], analysis.hidden_states[1].unsqueeze(0)
    with torch.inference_mode():
        query, key = layer.query_key(x)
        value = layer.self_attn._split_heads(layer.self_attn.v_proj(layer.layer_norm1(x)))
        expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=layer.self_attn.scale)
    for moved in (analysis.record, analysis.record.moved("cpu", loaded.model.encoder.layers)):
        assert len(moved.outputs) == len(outputs)
        if kept:
            torch.testing.assert_close(moved.outputs[1], expected[0], rtol=1e-5, atol=1e-6)


def test_exact_statistics_come_from_the_kept_inputs_without_a_new_forward():
    loaded = tiny_loaded(num_register_tokens=0)
    image = random_image(45, 70)
    analysis = analyze(loaded, image, long_side=64, max_stat_queries=10)
    assert analysis.statistics.num_queries == 10
    assert analysis.statistics_for(10) is analysis.statistics
    before = analysis.nbytes
    exact = analysis.statistics_for(None)
    assert analysis.statistics_for(None) is exact and analysis.nbytes == before + exact.nbytes
    pixels, _ = loaded.preprocessing(image, 64)
    expected = dense_statistics(dense_attentions(loaded, pixels), grid_w=8)
    assert exact.num_queries == 40
    for name, values in exact.as_dict().items():
        np.testing.assert_allclose(values, expected[name], atol=TOL, err_msg=name)


def test_class_token_entropies_of_a_head_that_attends_to_itself():
    """Whole-row entropy: H = −Σ_j a_0j ln a_0j over every token; patch-map entropy: the same over the patches,
    renormalised, p_j = a_0j / Σ_k a_0k. One head, 16 patches: the class token keeps 97% on itself and spreads
    3% evenly, so its row reads as focused while the patch map it draws is exactly uniform."""
    from analysis import LayerAttention
    from analysis.stats import layer_statistics
    patches, self_mass = 16, 0.97
    score = np.log(self_mass * patches / (1 - self_mass))  # e^s / (e^s + 16) = 0.97
    query = torch.zeros(1, 1 + patches, 2)
    query[0, 0, 0] = score
    key = torch.zeros(1, 1 + patches, 2)
    key[0, 0, 0], key[0, 1:, 1] = 1.0, 1.0
    lse = torch.logsumexp(query @ key.transpose(-1, -2), -1)
    stats = layer_statistics(LayerAttention(query, key, lse, 1.0), torch.arange(1, 1 + patches), 1, 4, 14)
    share = (1 - self_mass) / patches
    whole_row = -(self_mass * np.log(self_mass) + patches * share * np.log(share))
    assert stats["cls_entropy"].item() == pytest.approx(whole_row, abs=1e-5)
    assert stats["cls_patch_entropy"].item() == pytest.approx(np.log(patches), abs=1e-5)


def test_pixel_distance_counts_prefix_keys_as_zero_and_patch_distance_renormalises():
    """Every patch query puts 1/2 on the class token and 1/2 on its right neighbour (one patch, 14 px away):
    fig. 7's distance is ½ · 14 = 7 px; the patch-based one, renormalised over patch keys, is 1 patch."""
    from analysis import LayerAttention
    from analysis.stats import layer_statistics
    grid_w, patches = 4, 4  # one row of four patches; the last query looks left instead
    probs = torch.zeros(1, 1 + patches, 1 + patches)
    probs[0, :, 0] = 0.5
    for i in range(patches):
        probs[0, 1 + i, 1 + (i + 1 if i + 1 < patches else i - 1)] = 0.5
    probs[0, 0, 0] = 1.0
    log_probs = probs.clamp_min(1e-30).log()
    # log_probs = q · kᵀ − lse with k = identity and lse = 0
    attention = LayerAttention(log_probs, torch.eye(1 + patches).unsqueeze(0), torch.zeros(1, 1 + patches), 1.0)
    stats = layer_statistics(attention, torch.arange(1, 1 + patches), 1, grid_w, 14)
    assert stats["mean_distance_px"].item() == pytest.approx(7.0, abs=1e-4)
    assert stats["mean_distance"].item() == pytest.approx(1.0, abs=1e-4)
    assert stats["cls_mass"].item() == pytest.approx(0.5, abs=1e-6)


def test_rebuilt_layers_stay_within_their_budget_and_go_with_their_record():
    import gc

    from explorer.cache import ByteCache
    store = ByteCache(10**9, {"layer": 7000})
    analysis = analyze(tiny_loaded(), random_image(40, 40), long_side=32, store=store)
    store.put(("analysis", "a"), analysis)
    for layer in range(3):
        analysis.query_map(analysis.token_at(0, 0), layer, 0)
    per_layer = analysis.record.layer(0).nbytes
    assert 3500 < per_layer < 7000  # room for one rebuilt layer only
    assert store.keys("layer") == [("layer", analysis.record.serial, 2)]  # the newest; the others dropped
    assert store.keys("analysis") == [("analysis", "a")]  # the layer budget never drops anything else
    store.drop(lambda key: key[0] == "analysis")
    del analysis
    gc.collect()
    assert len(store) == 0  # a record's rebuilt layers go with it


def test_rebuild_refuses_hidden_states_that_are_not_the_layers_inputs():
    analysis = analyze(tiny_loaded(), random_image(40, 40), long_side=32)
    record = analysis.record
    record.hidden_states = (record.hidden_states[1], *record.hidden_states[1:])  # layer 0 given layer 1's input
    with pytest.raises(RuntimeError, match="not its layers' inputs"):
        record.layer(0)


def test_pooling_attention_is_kept_and_counted():
    analysis = analyze(tiny_loaded(), random_image(40, 40), long_side=32)
    before = analysis.nbytes
    analysis.record.observe_pooling(torch.softmax(torch.randn(1, 4, 17), -1))
    assert analysis.record.pooling.shape == (4, 17) and analysis.nbytes == before + 4 * 17 * 4


def test_analysis_refuses_a_precision_other_than_the_models():
    loaded = tiny_loaded()
    with pytest.raises(ValueError, match="needs a copy of the model in that precision"):
        analyze(loaded, random_image(40, 40), long_side=32, dtype="float16")
    assert analyze(loaded, random_image(40, 40), long_side=32, dtype="float32").dtype == "float32"
    assert next(loaded.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rows_are_rebuilt_with_the_models_own_weights(dtype, device):
    loaded = tiny_loaded(num_register_tokens=0)
    image = random_image(45, 70)
    pixels, _ = loaded.preprocessing(image, 64)
    attentions = dense_attentions(loaded, pixels)
    loaded.model.to(device, dtype)
    name = str(dtype).removeprefix("torch.")
    analysis = analyze(loaded, image, long_side=64, dtype=name, max_stat_queries=None)
    with pytest.raises(ValueError, match="needs a copy of the model"):
        analyze(loaded, image, long_side=64, dtype="float32")
    assert next(loaded.model.parameters()).dtype == dtype and analysis.dtype == name
    for layer, dense in enumerate(attentions):
        rows = analysis.record.layer(layer).probs(slice(None))
        assert (rows.sum(-1) - 1).abs().max() < 1e-2  # the kept lse fits the rebuilt queries and keys
        for head in range(4):  # the class token's row, rebuilt, against the one taken during the forward
            np.testing.assert_allclose(analysis.query_map(0, layer, head), analysis.cls_map(layer, head), atol=1e-3)
        np.testing.assert_allclose(analysis.cls_maps(layer), dense[:, 0, 1:].reshape(4, 5, 8).numpy(), atol=0.1)


@pytest.mark.parametrize("large", [False, True])
def test_sweeps_trim_after_every_layer_only_where_a_layers_working_memory_is_large(case, monkeypatch, large):
    """Above TRIM_LAYERS_ABOVE_BYTES of one layer's MLP activations the forward and the sweeps hand freed memory back
    after every layer; below it the forward does so once, at its end, and the sweeps not at all."""
    from analysis import engine, memory, record
    loaded = case[0]
    activations = 41 * loaded.model.config.intermediate_size * 4  # 41 tokens at long side 64, fp32
    monkeypatch.setattr(memory, "TRIM_LAYERS_ABOVE_BYTES", activations - 1 if large else activations)
    trims = {"record": 0, "engine": 0}
    for module, name in ((record, "record"), (engine, "engine")):
        monkeypatch.setattr(module, "release_free_memory", lambda name=name: trims.__setitem__(name, trims[name] + 1))
    analysis = analyze(loaded, random_image(45, 70), long_side=64, statistics=False)
    assert trims == {"record": 3 if large else 0, "engine": 1}  # 3 layers, then the forward's end
    analysis.rollout_map()
    assert trims["record"] == (6 if large else 0)
