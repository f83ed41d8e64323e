"""The reference training loop (Accelerate-driven) and its pieces."""
