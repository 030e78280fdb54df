"""serving stage package."""
