"""The model: PSViT's layers (layers.py), the stand-alone PSViT of one architecture (psvit.py) and the
weight-sharing supernet (supernet.py). No file I/O here."""
