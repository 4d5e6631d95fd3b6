"""The vision transformer, its configuration, checkpoint loading and preprocessing."""
from .checkpoint import Checkpoint, CheckpointError
from .config import IdeficsVisionConfig
from .loading import LoadedModel, build_model, load_model
from .preprocess import ImageGeometry, InvalidImageError, Preprocessing, decoded_bytes, load_image
from .vision import AttentionObserver, IdeficsVisionTransformer, VisionOutput

__all__ = [
    "AttentionObserver", "Checkpoint", "CheckpointError", "IdeficsVisionConfig", "IdeficsVisionTransformer",
    "ImageGeometry", "InvalidImageError", "LoadedModel", "Preprocessing", "VisionOutput", "build_model",
    "decoded_bytes", "load_image", "load_model",
]
