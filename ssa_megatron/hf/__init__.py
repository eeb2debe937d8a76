"""Standalone Hugging Face SSA model (copied into exported directories) and the export helpers."""
