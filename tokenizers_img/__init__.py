"""Image tokenizers: quantizers, VQGAN, ELM's binary autoencoder, SEED, TokenFlow. May import ``vision``."""
