"""Continued pre-training of a Chinese Bloom causal LM with HF Trainer + DeepSpeed ZeRO."""
