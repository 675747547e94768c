"""LAION-style aesthetic scoring of WebDataset shards on Ray."""

__version__ = "0.1.0"
