"""The model: PSViT's layers (layers.py), the stand-alone PSViT of one architecture (psvit.py), the
weight-sharing supernet (supernet.py) and how its layers slice their entangled weights (entangle.py). No file I/O
here."""
