#!/bin/bash
# `make gpu-smoke`, in one command on the lent GPU machine (no network there):
#   bash benchmarks/gpu_smoke.sh OUT [cuda|cpu] [more arguments of benchmarks.gpu_smoke]
# With cuda and no .venv yet, the two environments are made from the carried kit (`make gpu-kit` here, then carry
# .gpu-kit): each kit site installed into .gpu-kit/site-<name>, and .venv/bin/python (the workspace) and
# .venv-train-gpu/bin/python (LLaMA-Factory's), the names the workspace looks for, run the machine's own Python
# (torch, numpy, ...) with that site first. With cpu, the environments of `make setup` are used as they are.
set -u
OUT=${1:?usage: bash benchmarks/gpu_smoke.sh OUT [cuda|cpu] [more arguments]}
DEVICE=${2:-cuda}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 DISABLE_VERSION_CHECK=1
t0=$(date +%s)
if [ "$DEVICE" = cuda ] && [ ! -x .venv/bin/python ]; then
  py3=$(command -v python3)
  for pair in workspace:.venv train:.venv-train-gpu; do
    site=${pair%%:*}; venv=${pair#*:}; target=$PWD/.gpu-kit/site-$site
    ls .gpu-kit/$site/*.whl >/dev/null 2>&1 || { echo "[gpu-smoke] .gpu-kit/$site is empty: run make gpu-kit and carry .gpu-kit" | tee -a "$OUT/setup.log"; exit 2; }
    timeout 120 "$py3" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$target" \
      .gpu-kit/$site/*.whl >>"$OUT/setup.log" 2>&1 || { echo "[gpu-smoke] installing .gpu-kit/$site failed:"; tail -5 "$OUT/setup.log"; exit 2; }
    # Not a venv: the machine's python3 is itself a venv's (its torch is in that venv), which a new venv would not
    # see. The machine's interpreter with this site first on PYTHONPATH, the other site's entry taken out.
    mkdir -p "$venv/bin"
    cat > "$venv/bin/python" <<WRAP
#!/bin/bash
# made by benchmarks/gpu_smoke.sh: the machine's Python with the kit's $site site first
rest=\$(printf %s "\${PYTHONPATH:-}" | tr ':' '\n' | grep -v '/.gpu-kit/site-' | paste -sd: -)
export PYTHONPATH="$target\${rest:+:\$rest}"
exec "$py3" "\$@"
WRAP
    chmod +x "$venv/bin/python"
  done
  echo "[gpu-smoke] environments from the kit in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/setup.log"
fi
[ -x .venv/bin/python ] || { echo "[gpu-smoke] .venv is missing: run make setup"; exit 2; }
exec .venv/bin/python -m llmops bench gpu-smoke --out "$OUT" --device "$DEVICE" "$@"
