"""One forward pass → everything the explorer draws, keeping each layer's input and row log-sum-exps only."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from model import ImageGeometry, LoadedModel

from . import hidden
from .budget import ComputeLimits, Deadline, check_cost
from .flow import attention_flow
from .memory import release_free_memory
from .record import AttentionRecord, LayerAttention, LayerStore, fuse_heads
from .rollout import rollout
from .stats import DEFAULT_STAT_QUERIES, HeadStatistics, head_statistics, layer_statistics, stat_query_rows
from .summary import Summary, summary_of, summary_rows, top_vector

logger = logging.getLogger(__name__)
Progress = Callable[[float, str], None]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Analysis:
    """The result of one image at one resolution; every view is derived from it without rerunning the model."""

    model_name: str
    geometry: ImageGeometry
    num_prefix_tokens: int
    record: AttentionRecord  # each layer's input and row log-sum-exps: any attention row is rebuilt from them
    cls_attention: np.ndarray  # (layers, heads, N): the row standing in for the class token (see `summary`)
    token_norms: np.ndarray  # (layers + 1, N)
    summary: Summary  # what cls_attention, rollout, flow and the class-token statistics describe, in words
    distillation_attention: np.ndarray | None = None  # (layers, heads, N): the distillation token's row (DeiT)
    dtype: str = "float32"
    seconds: float = 0.0  # how long `analyze` took
    stat_queries: int | None = DEFAULT_STAT_QUERIES  # patch queries `statistics` averages (None: every one)
    _derived: dict = field(default_factory=dict, repr=False)  # rollout and flow maps, statistics, by parameters

    @property
    def num_layers(self) -> int:
        return self.record.num_layers

    @property
    def num_heads(self) -> int:
        return self.record.num_heads

    @property
    def hidden_states(self) -> tuple[torch.Tensor, ...]:
        """layers + 1 of (N, D): the embeddings, then each layer's output (layer l's input is hidden_states[l])."""
        return self.record.hidden_states

    @property
    def nbytes(self) -> int:
        """Everything this analysis keeps alive; rebuilt layers are kept apart (`AttentionRecord.store`)."""
        distillation = 0 if self.distillation_attention is None else self.distillation_attention.nbytes
        return (self.record.nbytes + self.cls_attention.nbytes + distillation + self.token_norms.nbytes
                + sum(value.nbytes for value in self._derived.values()))

    def to_grid(self, values: "np.ndarray | torch.Tensor") -> np.ndarray:
        """(..., N) over all tokens → (..., grid_h, grid_w) over the patches."""
        if isinstance(values, torch.Tensor):
            values = values.float().cpu().numpy()
        g = self.geometry
        return values[..., self.num_prefix_tokens:].reshape(*values.shape[:-1], g.grid_h, g.grid_w)

    def token_at(self, row: int, col: int) -> int:
        """Token index of patch (row, col)."""
        return self.num_prefix_tokens + row * self.geometry.grid_w + col

    @property
    def pooling_attention(self) -> np.ndarray | None:
        """The attention-pooling probe's attention over every token, per head: (heads, N); None without a head."""
        return None if self.record.pooling is None else self.record.pooling.cpu().numpy()

    def cls_maps(self, layer: int) -> np.ndarray:
        """The class token's (or its stand-in's, see `summary`) map for each head: (heads, grid_h, grid_w)."""
        return self.to_grid(self.cls_attention[layer])

    def cls_map(self, layer: int, head: "int | str") -> np.ndarray:
        """One head's class-token (or stand-in) map, or the heads fused ("mean", "max", "min"): (grid_h, grid_w)."""
        return self.to_grid(fuse_heads(torch.from_numpy(self.cls_attention[layer]), head))

    def distillation_map(self, layer: int, head: "int | str") -> np.ndarray:
        """One head's (or the fused heads') distillation-token map: (grid_h, grid_w)."""
        if self.distillation_attention is None:
            raise ValueError("this model has no distillation token")
        return self.to_grid(fuse_heads(torch.from_numpy(self.distillation_attention[layer]), head))

    def pooling_map(self, head: "int | str") -> np.ndarray:
        """One head's (or the fused heads') attention-pooling probe map, after the last layer: (grid_h, grid_w)."""
        if self.record.pooling is None:
            raise ValueError("this model has no attention-pooling head")
        return self.to_grid(fuse_heads(self.record.pooling, head))

    def _top(self, fusion: str) -> torch.Tensor | None:
        """The vector rollout and flow start from (None: the class token), as `summary.rollout_top` says."""
        return top_vector(self.summary, self.record.pooling, fusion, self.record.num_tokens, self.record.device)

    def rollout_map(self, fusion: str = "mean", discard_ratio: float = 0.0, last_layer: int | None = None,
                    progress: Callable[[float], None] | None = None) -> np.ndarray:
        """Attention rollout of the class token (or its stand-in) up to `last_layer` (default: all), cached."""
        last = self.num_layers - 1 if last_layer is None else int(last_layer)
        key = ("rollout", fusion, round(float(discard_ratio), 6), last)
        if key not in self._derived:
            self._derived[key] = rollout(self.record, fusion, discard_ratio, last, progress=progress,
                                         top=self._top(fusion))
        return self.to_grid(self._derived[key])

    def flow_map(self, fusion: str = "mean", progress: Callable[[float], None] | None = None) -> np.ndarray:
        """Attention flow to the class token (or its stand-in's sink) from each patch (small token counts), cached."""
        key = ("flow", fusion)
        if key not in self._derived:
            top = self._top(fusion)
            self._derived[key] = attention_flow(self.record, fusion, progress,
                                                None if top is None else top.cpu().numpy())
        return self.to_grid(self._derived[key])

    def query_map(self, token: int, layer: int, head: "int | str", direction: str = "row") -> np.ndarray:
        """What `token` attends to (direction "row") or what attends to it ("column"): (grid_h, grid_w)."""
        if direction not in ("row", "column"):
            raise ValueError(f"direction must be 'row' or 'column', got {direction!r}")
        attention = self.record.layer(layer, keep=True)  # clicking around one layer rebuilds it once
        probs = attention.probs(slice(token, token + 1))[:, 0] if direction == "row" else attention.column(token)
        return self.to_grid(fuse_heads(probs, head))

    @property
    def statistics(self) -> HeadStatistics:
        """Head statistics over `stat_queries` spread patch queries (from the forward, or on first use)."""
        return self.statistics_for(self.stat_queries)

    def statistics_for(self, max_queries: int | None,
                       progress: Callable[[float], None] | None = None) -> HeadStatistics:
        """Head statistics over `max_queries` spread patch queries (None: every one, exact), cached; no new forward."""
        rows = stat_query_rows(self.num_prefix_tokens, self.geometry.grid_h * self.geometry.grid_w, max_queries)
        key = ("statistics", len(rows))
        if key not in self._derived:
            self._derived[key] = head_statistics(self.record, self.num_prefix_tokens, self.geometry.grid_w,
                                                 max_queries, progress, torch.from_numpy(self.cls_attention),
                                                 self.summary.class_token)
        return self._derived[key]

    def norm_map(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Token norms after `layer` (layer -1: the embeddings) and the outlier mask: two (grid_h, grid_w)."""
        norms = torch.from_numpy(self.token_norms[layer + 1])
        patch_norms = norms[self.num_prefix_tokens:]
        return self.to_grid(norms), self.to_grid(
            torch.cat([torch.zeros(self.num_prefix_tokens, dtype=torch.bool), hidden.norm_outliers(patch_norms)]))

    def pca_map(self, layer: int) -> np.ndarray:
        """PCA of the patch features after `layer` as RGB in [0, 1]: (grid_h, grid_w, 3)."""
        rgb = hidden.pca_rgb(self.hidden_states[layer + 1][self.num_prefix_tokens:])
        g = self.geometry
        return rgb.cpu().numpy().reshape(g.grid_h, g.grid_w, 3)

    def similarity_map(self, layer: int, token: int) -> np.ndarray:
        """Cosine similarity of every patch's features after `layer` to those of `token`: (grid_h, grid_w)."""
        return self.to_grid(hidden.cosine_similarity(self.hidden_states[layer + 1], token))


def _check_dtype(loaded: LoadedModel, dtype: str | None) -> torch.dtype:
    """The model's own precision; another one is refused, since the analysis keeps using the module it ran."""
    model_dtype = next(loaded.model.parameters()).dtype
    if dtype is None:
        return model_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if DTYPES[dtype] != model_dtype:
        raise ValueError(f"this copy of the model is in {str(model_dtype).removeprefix('torch.')}: an analysis in "
                         f"{dtype} needs a copy of the model in that precision (analyze never casts the model)")
    return model_dtype


@torch.inference_mode()
def analyze(loaded: LoadedModel, image: Image.Image, long_side: int, dtype: str | None = None,
            max_stat_queries: int | None = DEFAULT_STAT_QUERIES, progress: Progress | None = None,
            original_size: tuple[int, int] | None = None, store: LayerStore | None = None,
            statistics: bool = True, limits: ComputeLimits | None = None,
            deadline: Deadline | None = None, keep_outputs: bool = False) -> Analysis:
    """Runs the model once on `image` resized to about `long_side` px and derives every drawn quantity.

    With `limits`, a geometry above them is refused before any pixel is resized (see `budget.check_cost`), and the
    analysis stops between layers once `deadline` (by default one of `limits.max_seconds`) has passed.

    Class-token rows (or the mean attention received, without a class token) and head statistics come from each
    layer's own queries and keys while the forward holds them; afterwards only the layers' inputs and row
    log-sum-exps are kept.

    Args:
        original_size: (width, height) of the image the caller's coordinates refer to, when `image` is a reduced
            copy of it (default: `image`'s own size).
        store: where layers rebuilt for clicks are kept (see `AttentionRecord`).
        statistics: False: the head statistics are left for their first use (from the kept inputs), so that the
            class-token maps are ready sooner.
        keep_outputs: keep each layer's attention output too, where they fit `record.KEEP_OUTPUTS_BYTES` (98 MB at
            1022 px on the default model), for an explanation that follows: its sweep then skips the attention
            forward (~10 % of a relevance map).
    """
    started = time.perf_counter()
    report = progress or (lambda fraction, desc: None)
    torch_dtype = _check_dtype(loaded, dtype)
    config, summary = loaded.config, summary_of(loaded.config)
    if limits is not None:
        check_cost(config, loaded.preprocessing.geometry(image.height, image.width, long_side), limits,
                   loaded.preprocessing)
        deadline = deadline or limits.deadline()
    pixels, geometry = loaded.preprocessing(image, long_side)
    num_prefix, layers = config.num_prefix_tokens, config.num_hidden_layers
    if original_size is not None:
        geometry = dataclasses.replace(geometry, orig_w=original_size[0], orig_h=original_size[1])
    rows = stat_query_rows(num_prefix, geometry.grid_h * geometry.grid_w, max_stat_queries).to(loaded.device)
    distillation = slice(int(config.class_token), int(config.class_token) + 1)  # the token after the class token
    # every layer's rows in one buffer, allocated before the forward (see record.py)
    shape = (layers, config.num_attention_heads, num_prefix + geometry.grid_h * geometry.grid_w)
    cls_rows = torch.empty(shape, device=loaded.device)
    distillation_rows = torch.empty(shape, device=loaded.device) if summary.distillation else None
    per_layer = []

    def on_layer(index: int, attention: LayerAttention) -> None:
        cls_rows[index].copy_(summary_rows(attention, summary))
        if distillation_rows is not None:
            distillation_rows[index].copy_(attention.probs(distillation)[:, 0])
        if statistics:
            per_layer.append(layer_statistics(attention, rows, num_prefix, geometry.grid_w, geometry.patch_size,
                                              cls_rows[index], summary.class_token))
        record.release_between_layers()
        if deadline is not None:
            deadline.check()
        report((index + 1) / layers, f"layer {index + 1}/{layers}")

    record = AttentionRecord(loaded.model.encoder.layers, geometry.patch_size, on_layer, store, keep_outputs)
    report(0.0, f"running the model at {geometry.input_h}×{geometry.input_w}")
    output = loaded.model(pixels.to(loaded.device, torch_dtype), interpolate_pos_encoding=True, observer=record)
    record.on_layer = None  # the closure would keep the per-layer tensors alive
    del output
    release_free_memory()  # the forward's working memory (see analysis.memory)
    report(1.0, "done")
    analysis = Analysis(loaded.name, geometry, num_prefix, record, cls_rows.cpu().numpy(),
                        hidden.token_norms(record.hidden_states).cpu().numpy(), summary,
                        distillation_rows.cpu().numpy() if distillation_rows is not None else None,
                        dtype=str(torch_dtype).removeprefix("torch."), stat_queries=max_stat_queries)
    if statistics:
        analysis._derived[("statistics", len(rows))] = HeadStatistics.stack(per_layer, len(rows))
    analysis.seconds = time.perf_counter() - started
    return analysis
