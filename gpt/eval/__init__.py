"""Evaluation: the Ollama judge, the scikit-learn spam baselines and small model metrics."""
