"""`python -m datagen` (PYTHONPATH=data, or the workspace env): regenerate every shipped file under data/raw/."""
from datagen import corpus, kobest, pretrain_text, screens

if __name__ == "__main__":
    for module in (screens, kobest, corpus, pretrain_text):
        module.main([])
