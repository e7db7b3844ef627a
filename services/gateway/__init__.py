"""Ingress: validation, tokenization, admission, streaming from the chosen Triton replica."""
