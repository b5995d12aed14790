"""Decoding: turn sampled embeddings into images (diffusion decoders and resumable generation)."""
