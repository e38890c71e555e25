#!/usr/bin/env bash
# Download the wheels bench/gpu.sh needs on a GPU machine without network (Python 3.12, x86-64
# Linux): medfed's dependencies that such a machine's image lacks, at the versions installed here.
# torch and the common scientific stack are expected there already; Ray (Flower's simulation
# engine, a 74 MB wheel) is left out on purpose: gpu.sh then runs the federation in one process.
#
#   bash bench/gpu_wheels.sh            # fills .whl/ (ignored by git through .git/info/exclude)
#   DEST=/somewhere bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${DEST:-.whl}
if [ "$DEST" = ".whl" ] && [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
  echo '/.whl/' >> .git/info/exclude
fi
PACKAGES="flwr monai opacus pydantic pydantic-core annotated-types typing-inspection pydicom pycryptodome
cryptography cffi pycparser iterators tomli tomli-w"
PINNED=""
for name in $PACKAGES; do
  version=$($PY -c "from importlib.metadata import version; print(version('$name'))")
  PINNED="$PINNED $name==$version"
done
mkdir -p "$DEST"
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" $PINNED
du -sh "$DEST"
