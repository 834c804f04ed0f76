"""The trained-regime study (docs/results.md): units of work, each a small committed result file under
docs/study/, a queue that two one-thread workers drain, and the page rendered from the files alone."""
