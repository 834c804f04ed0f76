"""The engine: distributed helpers (distributed.py), the optimizer recipe (optim.py), the checkpoint layout
(checkpoint.py) and the training loop (loop.py) that supernet training and retraining share."""
