"""Helpers the stage scripts share, each file named after the one thing it does."""
