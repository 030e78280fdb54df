"""Stage package: data preparation and finetuning.

  prepare_stage.py  the prepare stage (contract) over prepare.py: read, validate, clean, mask PII, dedupe, split
  finetune_stage.py the finetune stage (contract) over train.py: LLaMA-Factory config, training, resume, merge
  verify_adapter.py runs in the train env: the adapter loads and changes outputs
  base_model.py     builds the embedded tiny base model        (its benchmarks: benchmarks/prepare.py, finetune.py)
Imports workspace/ only; never another stage package.
"""
