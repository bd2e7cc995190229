"""Recipes that reproduce the paper's tables: linear functions over the library, resumable, one per table."""
