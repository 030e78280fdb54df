"""finetune stage package."""
