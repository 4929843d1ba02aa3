#!/usr/bin/env bash
# The one prepared style-worker check for a GPU machine (run from the repository root):
#   1. show the card and driver (nvidia-smi),
#   2. verify that CUDAExecutionProvider actually loads in onnxruntime-gpu (the worker's own probe),
#   3. run `stylerec bench style --provider cuda --json` (worker vs bare ORT loop, batch 1/2/4/8).
# Results land in ${OUT:-out}/gpu/ : nvidia-smi.txt, probe.json, style-cuda.json, bench.log.
# Exit codes: 0 ok, 3 no GPU / provider does not load (probe.json says why), other = bench failure.
# Keep it short: a GPU lease is minutes. STYLE_GPU_IMAGES / STYLE_GPU_REPEATS scale the bench.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${OUT:-out}/gpu
mkdir -p "$DEST"

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
"$PY" -m cli.main bench style --provider cuda --json \
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
