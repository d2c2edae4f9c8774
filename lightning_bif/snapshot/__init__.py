"""One BIF snapshot of a model, without Lightning: the snapshot unit, its record, and ``estimate_bif``."""
