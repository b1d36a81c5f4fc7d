"""Autoregressive image generators and speculative decoding. May import ``vision`` and ``tokenizers_img``."""
