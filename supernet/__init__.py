"""Everything that needs torch: the model (model/), data (data/), the training engine (engine/) and the two
training apps, `python -m supernet.train` (SPOS supernet) and `python -m supernet.retrain` (one architecture)."""
