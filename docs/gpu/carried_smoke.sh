#!/bin/bash
# GPU smoke of the finetune path (SFT LoRA, then DPO from that adapter) with the carried LLaMA-Factory stack.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DISABLE_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false LLAMAFACTORY_VERBOSITY=INFO
t0=$(date +%s.%N)
timeout 90 python -m pip install --no-index --no-deps --target /tmp/site -q .cache/devwheels/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD
echo "install $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
timeout 90 python -c "
import time; t=time.time()
import torch, transformers, peft, trl, datasets, llamafactory
print('import', round(time.time()-t,1), 's; torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), '; transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'llamafactory', llamafactory.__version__)
" 2>&1 | tail -5 || exit 1
for stage in sft dpo; do
  s=$(date +%s.%N)
  timeout 200 python -m finetune.lf_train .cache/devcfg/$stage.yaml --report $OUT/${stage}_report.json > $OUT/$stage.log 2>&1
  rc=$?
  echo "$stage rc=$rc wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s"
  tail -4 $OUT/$stage.log
  cp /tmp/out-$stage/trainer_log.jsonl $OUT/${stage}_trainer_log.jsonl 2>/dev/null
  cp /tmp/out-$stage/trainer_state.json $OUT/${stage}_trainer_state.json 2>/dev/null
  cp /tmp/out-$stage/all_results.json $OUT/${stage}_all_results.json 2>/dev/null
  [ $rc -eq 0 ] || break
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
