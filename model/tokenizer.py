"""Prompts to token ids with a checkpoint's own tokenizer files, through maintained libraries: Hugging Face
`tokenizers` for `tokenizer.json` (CLIP's BPE, whatever the file defines), SentencePiece for `spiece.model` (SigLIP),
never a hand-written BPE."""
from __future__ import annotations

import json
import logging
import re
import string
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
TOKENIZER_MODELS = ("tokenizer.json", "spiece.model")  # one of them is needed
TOKENIZER_FILES = (*TOKENIZER_MODELS, "tokenizer_config.json", "special_tokens_map.json")  # fetched from the hub
SIGLIP_PAD = "</s>"  # SiglipTokenizer's pad and end-of-sequence token


def canonical_siglip_text(text: str) -> str:
    """SigLIP's text canonicalisation (big_vision; transformers' SiglipTokenizer): lower case, ASCII punctuation
    removed, whitespace runs collapsed, ends stripped."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


class PromptTokenizer:
    """A checkpoint's tokenizer: prompts → (P, T) token ids, truncated at the model's context length with the
    end-of-sequence token kept; SigLIP's padded to the context length, as it was trained, others to the longest."""

    def __init__(self, folder: Path, context_length: int, siglip: bool):
        self.context_length, self.siglip = context_length, siglip
        special = _special_tokens(folder)
        if (folder / "spiece.model").is_file() and (siglip or not (folder / "tokenizer.json").is_file()):
            import sentencepiece
            self._spm = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
            self._eos = self._spm.piece_to_id(special.get("eos_token", SIGLIP_PAD))
            self._pad = self._spm.piece_to_id(special.get("pad_token", SIGLIP_PAD))
            self.source = "spiece.model"
        else:
            from tokenizers import Tokenizer
            self._spm = None
            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self._tokenizer.no_padding()
            self._tokenizer.enable_truncation(context_length)  # special tokens included: the end token stays
            pad = self._tokenizer.token_to_id(special.get("pad_token", SIGLIP_PAD)) if siglip else None
            self._pad = pad if pad is not None else 0
            self.source = "tokenizer.json"

    @staticmethod
    def available(folder: Path | None) -> bool:
        return folder is not None and any((folder / name).is_file() for name in TOKENIZER_MODELS)

    def ids(self, prompt: str) -> list[int]:
        """One prompt's token ids, special tokens included, at most `context_length`."""
        text = canonical_siglip_text(prompt) if self.siglip else prompt
        if self._spm is not None:
            return self._spm.encode(text)[: self.context_length - 1] + [self._eos]
        return self._tokenizer.encode(text).ids

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(P, T) int64 ids; padding follows the last token: SigLIP's pad id to the context length, else zeros to the
        longest prompt (CLIP's causal tower never lets a token see the padding after it)."""
        rows = [self.ids(p) for p in prompts]
        length = self.context_length if self.siglip else max(map(len, rows))
        return torch.tensor([row + [self._pad] * (length - len(row)) for row in rows], dtype=torch.long)


def _special_tokens(folder: Path) -> dict[str, str]:
    """pad and eos tokens named by tokenizer_config.json or special_tokens_map.json, as plain strings."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            values = json.loads((folder / name).read_text()) if (folder / name).is_file() else {}
        except (json.JSONDecodeError, OSError):
            logger.warning("%s is not valid JSON: ignored", name)
            continue
        for key in ("pad_token", "eos_token"):
            value = values.get(key) if isinstance(values, dict) else None
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                found[key] = value
    return found
