#!/usr/bin/env bash
# The GPU check, prepared to run once on a lent device (the `run` tool): serving, tenants and fronts on CUDA
# (float16), figures into $OUT. CI never runs this; every path it exercises also runs on the CPU.
#   run: bash bench/device.sh      (needs ../shared/data/sst2 beside the checkout, or MODELMETER_SHARED_DIR)
set -euo pipefail
OUT="${OUT:-/tmp/modelmeter-device}"
mkdir -p "$OUT"
python3 -m venv /tmp/mm-venv
/tmp/mm-venv/bin/pip install --quiet --upgrade pip
/tmp/mm-venv/bin/pip install --quiet torch   # the device's CUDA build
/tmp/mm-venv/bin/pip install --quiet -e ".[dev]"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt"
cd bench
/tmp/mm-venv/bin/python serving.py --seconds 10 2>&1 | tail -20 > "$OUT/serving.txt"
/tmp/mm-venv/bin/python tenants.py --seconds 10 \
  --phases base,full-1,full-24,lora-1-uniform,lora-100-uniform,lora-1000-uniform,lora-1000-zipf,peft-100 \
  2>&1 | grep -v "Loading weights" | tail -40 > "$OUT/tenants.txt"
# The fronts over one engine on the real GPU (bench/fronts.py --real), and on the simulated device for comparison;
# needs wrk (the load client) and Redis (--workers 2); skipped, saying so, where either is missing.
if command -v wrk >/dev/null || (apt-get install -y -qq wrk >/dev/null 2>&1 && command -v wrk >/dev/null); then
  if ! redis-cli ping >/dev/null 2>&1; then
    (apt-get install -y -qq redis-server >/dev/null 2>&1 && redis-server --daemonize yes --save "" >/dev/null) || true
  fi
  if redis-cli ping >/dev/null 2>&1; then export MODELMETER_REDIS_URL=redis://127.0.0.1:6379/9; fi
  /tmp/mm-venv/bin/pip install --quiet py-spy || true
  /tmp/mm-venv/bin/python fronts.py --seconds 10 --real 2>&1 | tail -60 > "$OUT/fronts-cuda.txt"
  /tmp/mm-venv/bin/python fronts.py --seconds 10 2>&1 | tail -60 > "$OUT/fronts-simulated.txt"
else
  echo "wrk unavailable: fronts not measured" > "$OUT/fronts-cuda.txt"
fi
