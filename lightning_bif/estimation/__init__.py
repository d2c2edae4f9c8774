"""Localized SGLD chains, the streaming accumulator and the BIF estimator (no Lightning, no files)."""
