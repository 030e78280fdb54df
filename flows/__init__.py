"""flows stage package."""
