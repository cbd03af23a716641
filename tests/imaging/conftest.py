"""Fixtures shared by the imaging tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_aesthetic(tmp_path_factory):
    """A tiny random CLIP vision tower folder (``save_pretrained``, with its image processor) and the
    aesthetic head of matching width saved both as ``head.safetensors`` and ``head.pth`` (the two formats
    ``imaging.aesthetic.load_head`` reads). Returns (folder, path of head.safetensors)."""
    pytest.importorskip("transformers")
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from imaging.aesthetic import AestheticMLP

    folder = tmp_path_factory.mktemp("tiny-clip-vision")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=8)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    head = AestheticMLP(8).state_dict()
    save_file(head, str(folder / "head.safetensors"))
    torch.save(head, folder / "head.pth")
    return folder, folder / "head.safetensors"
