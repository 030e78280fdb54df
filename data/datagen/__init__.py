"""Generators of the shipped data under data/raw/ (screens, KoBEST-format samples, RAG corpus, pretraining text)."""
