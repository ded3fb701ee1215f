"""Inference with the map: decoding strategies and caches."""
