"""Tiny image-text checkpoints for the tests, saved by transformers with a tokenizer beside them: CLIPModel with a
small byte-level BPE (transformers' CLIPTokenizer, written as tokenizer.json), SiglipModel with a SentencePiece model
trained here on a few sentences (spiece.model, read by transformers' SiglipTokenizer)."""
from __future__ import annotations

import string
from pathlib import Path

import transformers as tf

from tests.helpers import save

WORDS = ("a", "photo", "of", "the", "dog", "cat", "car", "red", "blue", "sky", "on", "in", "with", "and", "green",
         "small", "big", "an", "image", "person")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
CONTEXT = 12  # tokens, special ones included: long prompts are truncated to it


def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary: every letter, digit and punctuation mark (alone and word-final), the merges that
    spell WORDS, and CLIP's two special tokens."""
    vocab: dict[str, int] = {}
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        for piece in (char, char + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = (pieces[0], pieces[1])
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def clip_tokenizer(folder: Path) -> tf.CLIPTokenizer:
    vocab, merges = clip_bpe()
    tokenizer = tf.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_clip(folder: Path, seed: int = 11, **kwargs) -> tuple[tf.CLIPModel, tf.CLIPTokenizer]:
    """A CLIPModel (`kwargs` go to save_pretrained: max_shard_size=…) with its tokenizer."""
    tokenizer = clip_tokenizer(folder)
    text = dict(TEXT, vocab_size=len(tokenizer.get_vocab()), max_position_embeddings=CONTEXT,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    config = tf.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16, logit_scale_init_value=2.0)
    return save(tf.CLIPModel(config), folder, seed, **kwargs), tokenizer


def siglip_tokenizer(folder: Path) -> tf.SiglipTokenizer:
    import sentencepiece
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"{a} {b} of {c}" for a in WORDS for b in WORDS[:6] for c in WORDS[::3]))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=36, model_type="unigram",
        pad_id=-1, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    corpus.unlink()
    (folder / "spiece.vocab").unlink()
    tokenizer = tf.SiglipTokenizer(str(folder / "spiece.model"), model_max_length=CONTEXT)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_siglip(folder: Path, seed: int = 12) -> tuple[tf.SiglipModel, tf.SiglipTokenizer]:
    tokenizer = siglip_tokenizer(folder)
    text = dict(TEXT, vocab_size=len(tokenizer.get_vocab()), max_position_embeddings=CONTEXT,
                projection_size=VISION["hidden_size"], pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id)
    config = tf.SiglipConfig(text_config=text, vision_config=VISION)
    return save(tf.SiglipModel(config), folder, seed), tokenizer
