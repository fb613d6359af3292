#!/usr/bin/env bash
# Builds .devwheels/ for scripts/gpu_check.sh: the wheels a bare CUDA machine with PyTorch (Python 3.12,
# no internet) lacks for imgflow's training path, at the lock's versions, and Ray slimmed of its Java
# jars, dashboard bundle and RLlib (79 MB -> 43 MB, to fit a 64 MiB transfer), plus the t10k files.
set -euo pipefail
cd "$(dirname "$0")/.."
W=.devwheels
mkdir -p $W/fmnist
PY=.venv/bin/python
PLATFORMS=""
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS="$PLATFORMS --platform ${p}_x86_64"
done
pin() { grep -iE "^$1==" requirements.lock; }
NAMES="jsonschema jsonschema-specifications referencing rpds-py rfc3339-validator jsonpointer colorful pydantic
pydantic_core annotated-types typing-inspection annotated-doc pydot timm huggingface_hub httpx2 httpcore2 h2 hpack
hyperframe truststore wcwidth typer typing_extensions click"
for n in $NAMES; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d $W "$(pin "$n")"
done
RAY=$(pin ray)
tmp=$(mktemp -d)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d "$tmp" "$RAY"
$PY - "$tmp"/ray-*.whl $W/ray-slim.zip <<'PYEOF'
import sys, zipfile
src, out = zipfile.ZipFile(sys.argv[1]), zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_DEFLATED)
for info in src.infolist():
    if not info.filename.startswith(("ray/jars/", "ray/dashboard/client/", "ray/rllib/")):
        out.writestr(info, src.read(info))
out.close()
PYEOF
rm -rf "$tmp"
cp /usr/share/datasets/fashion-mnist/t10k-* $W/fmnist/
grep -qx '/.devwheels/' .git/info/exclude 2>/dev/null || echo '/.devwheels/' >> .git/info/exclude
du -sh $W
