"""Inputs: the source registry, the verified downloader, parsers and splits, and token
windows over uint16 token files."""
