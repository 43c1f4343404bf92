"""Scanpy-style functions."""
