"""The Mistral transformer, its attention rule and RoPE, and building it from a checkpoint."""
