"""Hugging Face transformers image classifiers written as a user's model directory would be
(``save_pretrained``: config.json, model.safetensors; the image processor's preprocessor_config.json)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

TINY = {
    "vit": lambda: transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    ),
    "deit": lambda: transformers.DeiTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    ),
    "convnext": lambda: transformers.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
    "resnet": lambda: transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic"
    ),
}
CLASSES = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassification"}
CLASSES |= {"convnext": "ConvNextForImageClassification", "resnet": "ResNetForImageClassification"}


def hf_dir(root: Path, kind: str = "vit", num_labels: int = 10, processor: bool = True, seed: int = 0) -> Path:
    """A randomly initialised transformers classifier saved as a user's model directory would be."""
    torch.manual_seed(seed)
    config = TINY[kind]()
    config.num_labels = num_labels
    model = getattr(transformers, CLASSES[kind])(config)
    out = root / kind
    model.save_pretrained(out)
    if processor:
        if kind in ("vit", "deit"):  # ViT's processor squashes to the input size; DeiT's resizes, then crops
            p = transformers.ViTImageProcessor(
                size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            )
            if kind == "deit":
                p = transformers.DeiTImageProcessor(
                    size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}, resample=3
                )
        else:
            p = transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)
        p.save_pretrained(out)
    return out
