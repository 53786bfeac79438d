"""rmod-distill."""
