"""Self-tuning rules: sampler settings chosen from curvature measured at w* and from the training run."""
