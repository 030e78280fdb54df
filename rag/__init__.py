"""rag stage package."""
