#!/usr/bin/env bash
# The GPU check as one short run (sized for a 10-minute lease of a CUDA machine): the gpu-marked tests,
# then `python -m bench gpu` (Ray Train vs a plain loop on the same GPU). Results and logs go to $OUT.
#
# With a project venv (`make setup`), `make test-gpu` does the same. This script is for a bare CUDA
# machine that has PyTorch but no venv and no internet: it installs wheels carried in .devwheels/ (Ray,
# slimmed of its Java jars and dashboard bundle to fit the transfer, plus the pure-Python packages
# imgflow's training path imports) into /tmp/site, and builds a Fashion-MNIST folder from the carried
# t10k files (the "train" files are the t10k images mirrored left-right, so the two splits share no
# file: the dataset package itself is too large to carry). Build .devwheels/ with scripts/gpu_wheels.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/imgflow-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}

if [ -d .devwheels ] && ! [ -x .venv/bin/python ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .devwheels/*.whl || exit 1
  $PY - <<'EOF' || exit 1
import os, zipfile
z = zipfile.ZipFile(".devwheels/ray-slim.zip")
for info in z.infolist():  # keep the executable bits of Ray's binaries (raylet, gcs_server)
    path = z.extract(info, "/tmp/site")
    mode = (info.external_attr >> 16) & 0o777
    if mode:
        os.chmod(path, mode)
EOF
  export PYTHONPATH=/tmp/site:$PWD
fi
[ -x .venv/bin/python ] && PY=.venv/bin/python

FM=/usr/share/datasets/fashion-mnist
if ! [ -f $FM/train-images-idx3-ubyte.gz ]; then
  mkdir -p $FM && cp .devwheels/fmnist/t10k-* $FM/
  $PY - <<'EOF' || exit 1
import gzip
import numpy as np
d = "/usr/share/datasets/fashion-mnist/"
raw = gzip.open(d + "t10k-images-idx3-ubyte.gz").read()
images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:, :, ::-1]
gzip.open(d + "train-images-idx3-ubyte.gz", "wb").write(raw[:16] + images.tobytes())
gzip.open(d + "train-labels-idx1-ubyte.gz", "wb").write(gzip.open(d + "t10k-labels-idx1-ubyte.gz").read())
EOF
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, ray, timm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
rc=0
timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -m gpu -p no:cacheprovider -q -rA ${GPU_TESTS:-tests/train/test_gpu.py tests/train/test_training.py} 2>&1 | tee "$OUT/pytest.log" || rc=1
timeout "${BENCH_TIMEOUT:-240}" $PY -m bench gpu ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" || rc=1
cp bench/results/gpu.json "$OUT/" 2>/dev/null
exit $rc
