"""Architecture search over a SearchSpace: the pure evolutionary loop, its app and the evaluation glue."""
