"""Looking at an influence log: figures, the token view, the TensorBoard sink and the CLI."""
