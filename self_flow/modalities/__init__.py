"""Modality adapters: each turns its raw arrays into tokens (B, N, C) with position ids (N, 3)."""
