"""The PSViT search space, the ArchSpec JSON and the analytic cost model (pure Python, no torch)."""
