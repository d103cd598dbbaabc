"""Mutation-based property tests of every wire-format parser (also run by bench/fuzz.py)."""
