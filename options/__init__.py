"""Typed settings: the blocks of Implementation.json (options.blocks)."""
