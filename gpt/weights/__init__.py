"""Importing published weights into gptflow checkpoints."""
