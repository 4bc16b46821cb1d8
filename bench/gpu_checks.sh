#!/usr/bin/env bash
# Every GPU check in one run, for a machine with a CUDA GPU and PyTorch (no vLLM, no network): what the machine is,
# the tests that need CUDA (the 2:4 runtime's probes and packing on the real kernels; pruning and recovery on the
# GPU against the CPU), into gpu_tests.log, then bench/gpu_sparse.py writing gpu_sparse.md and its JSON; all under
# OUT_DIR (default docs/). Besides PyTorch it needs the packages the CLI imports (transformers, click, safetensors,
# tqdm, gguf, pytest); on a machine without network, carry the missing ones as wheels.
#
#     bash bench/gpu_checks.sh [OUT_DIR]
#
# Each step runs whatever the one before it did; the exit status is the first failure's.
set -u -o pipefail
# Checked before anything is written: on a machine without a GPU the recorded logs and pages stay as they are.
python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "Error: bench/gpu_checks.sh needs a CUDA GPU visible to torch")' || exit 1
out=${1:-docs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
{
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "cuSPARSELt",
        torch.backends.cusparselt.is_available() and torch.backends.cusparselt.version(), "transformers", transformers.__version__)'
  python3 -m pytest -q -p no:cacheprovider -m "not e2e" tests/test_cuda.py tests/test_sparse24.py 2>&1
} | tee "$out/gpu_tests.log" || status=$?
python3 bench/gpu_sparse.py --out "$out/gpu_sparse.md" || { rc=$?; [ $status -ne 0 ] || status=$rc; }
exit $status
