#!/usr/bin/env bash
# Runs bench.gpu_check (the scoring stages on one GPU, without Ray) with the python3 on PATH ($PYTHON to
# choose another), on a machine that has torch but may lack open_clip, ftfy, wcwidth and simplejpeg and
# cannot reach a package registry.
#
#   bash bench/gpu_check.sh [bench.gpu_check options]    e.g. --smoke-test-on-cpu, --budget-s 200
#   bash bench/gpu_check.sh --prepare                     here, once: fetch the wheels and copy the heads
#
# The missing packages come as wheels from bench/gpu_wheels/ (made by --prepare, carried to the device
# machine) and go into a folder of their own put first on PYTHONPATH: the machine's own packages stay
# as they are, and neither root nor a writable site-packages is needed. A python that already imports
# them (the project's .venv) runs as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=bench/gpu_wheels
PACKAGES=(open_clip_torch ftfy wcwidth simplejpeg)

if [ "${1:-}" = "--prepare" ]; then
    # The versions the project's .venv runs, so the device runs the code the tests here ran.
    pin() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
    specs=("open_clip_torch==$(pin open_clip_torch 3.3.0)" "ftfy==$(pin ftfy 6.3.1)"
           "wcwidth==$(pin wcwidth 0.9.4)" "simplejpeg==$(pin simplejpeg 1.9.0)")
    rm -rf "$WHEELS" && mkdir -p "$WHEELS/heads"
    # The device's python is CPython 3.12 on x86-64 Linux.
    "${PIP_PYTHON:-python3}" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$WHEELS" "${specs[@]}"
    # The LAION heads of the default models, from the ../shared beside this checkout (which does not
    # travel to the device); without them the check scores with seeded random heads of the same shape.
    heads=../shared/reference/laion-aesthetics/heads
    for head in "sac+logos+ava1-l14-linearMSE.pth" "sa_0_4_vit_b_32_linear.pth"; do
        [ -f "$heads/$head" ] && cp "$heads/$head" "$WHEELS/heads/" || echo "no $heads/$head: random heads there"
    done
    ls -l "$WHEELS" "$WHEELS/heads" && du -sh "$WHEELS"
    exit 0
fi

if ! "$PYTHON" -c "import open_clip, ftfy, wcwidth, simplejpeg" >/dev/null 2>&1; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "$PYTHON lacks open_clip/simplejpeg and $WHEELS has no wheels: run 'bash bench/gpu_check.sh --prepare'" \
             "where a package registry is reachable, and carry $WHEELS" >&2
        exit 2
    fi
    SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu_check_site}
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PYTHON" -c "import open_clip, ftfy, wcwidth, simplejpeg" >/dev/null 2>&1; then  # not from a run before
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            --find-links "$WHEELS" "${PACKAGES[@]}"
        echo "installed ${PACKAGES[*]} from $WHEELS into $SITE (on PYTHONPATH)"
    fi
fi
export PYTHONUNBUFFERED=1  # progress lines arrive even if the run is cut off
exec "$PYTHON" -m bench.gpu_check "$@"
