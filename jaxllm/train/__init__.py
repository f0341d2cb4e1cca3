"""The generic training loop (`loop`) and one small module per stage."""
