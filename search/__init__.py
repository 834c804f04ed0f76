"""Architecture search over a SearchSpace: constraints (constraint.py), the pure loop (evolution.py), the
inherited-weight scorer (inherited.py, the only torch), the outputs (report.py) and the app (evolve.py)."""
