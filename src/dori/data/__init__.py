"""Prompt sets, image stores and the miniworld data generator."""
