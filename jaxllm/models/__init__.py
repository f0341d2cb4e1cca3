"""Model families: `llama` (decoder-only LLaMA family); shared layers in `layers`."""
