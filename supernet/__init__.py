"""Torch side of PSViT-NAS: layers, the PSViT model, the weight-sharing supernet, data and training."""
