"""Fixtures shared by the tests, the benchmarks and the evaluation harness: tiny random HF
vision-language models of every supported family, built from configs (no downloads), with
batch makers in each family's real layout, and their one vocabulary.
"""
from .tiny import TINY_FAMILIES, build_tiny_model, collate, sample_batches, tiny_tokenizer

__all__ = ["TINY_FAMILIES", "build_tiny_model", "collate", "sample_batches", "tiny_tokenizer"]
