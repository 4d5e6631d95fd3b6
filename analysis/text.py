"""Asking an analysed image in words: zero-shot scores of prompts, and the image-text similarity that relevance
explains for a prompt (target "text:PROMPT"). The image embedding is the vision tower's pooled output (projected
where the checkpoint projects it), taken from the analysis's kept last layer: no new forward. The prompts' embeddings
are kept by the text model itself (per model and prompt), so a new image never re-encodes them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model import LoadedModel
from model.text import TextModel
from model.text_formats import FAMILIES

from .engine import Analysis


class TextError(ValueError):
    """A prompt request this model cannot answer; the message says which families can."""


@dataclass
class ZeroShot:
    """The model's scores for an image and prompts, in the prompts' order."""

    prompts: list[str]
    scores: list[float]  # softmax over the prompts (CLIP), or each prompt's sigmoid (SigLIP)
    logits: list[float]  # the scaled cosine (plus SigLIP's bias), before the softmax or sigmoid
    kind: str  # "softmax" or "sigmoid"


def text_model(loaded: LoadedModel, field: str = "prompts") -> TextModel:
    """The model's text tower, or a plain message naming the families that have one."""
    if loaded.text is None:
        raise TextError(f"{field}: this model ({loaded.name}) has no text tower; prompts need an image-text model: "
                        f"{FAMILIES}, with its tokenizer files (tokenizer.json or spiece.model) beside the weights.")
    return loaded.text


@torch.inference_mode()
def image_embedding(loaded: LoadedModel, analysis: Analysis) -> torch.Tensor:
    """(1, E) the pooled output of the analysed image, from the kept last layer; cached in the analysis."""
    key = ("text", "image_embedding")
    if key not in analysis._derived:
        x = analysis.record.hidden_states[-1].unsqueeze(0)
        analysis._derived[key] = loaded.model.pool(x)[1].float().cpu().numpy()
    return torch.from_numpy(analysis._derived[key])


def similarity(loaded: LoadedModel, image_features: torch.Tensor, prompt: str) -> torch.Tensor:
    """The image-text similarity logit of a batch of pooled image features (B, E) with one prompt: (B,).

    logit_scale·cos for CLIP, plus the bias for SigLIP, exactly as the model computes it; differentiable in the image
    features (the prompt's embedding is a constant), so perturbed or backpropagated features may be passed."""
    text = text_model(loaded, "target")
    features = text.embed([prompt]).to(image_features.device).clone()  # (1, E), a constant (out of inference mode)
    return text.tower.logits(image_features, features)[:, 0]


def zero_shot(loaded: LoadedModel, analysis: Analysis, prompts: list[str]) -> ZeroShot:
    """Each prompt's score for the analysed image: softmax over the prompts with the model's logit scale (CLIP), or
    each prompt's sigmoid (SigLIP)."""
    text = text_model(loaded)
    with torch.inference_mode():
        image = image_embedding(loaded, analysis).to(text.tower.logit_scale.device)
        logits = text.tower.logits(image, text.embed(prompts))  # (1, P)
        scores = text.scores(logits)
    return ZeroShot(list(prompts), scores[0].tolist(), logits[0].tolist(), "sigmoid" if text.sigmoid else "softmax")
