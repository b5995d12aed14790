"""Phase 2 samplers: new embeddings in the low-likelihood region of the latent space, and their containers."""
