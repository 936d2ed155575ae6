#!/usr/bin/env bash
# The GPU figures in bench/baselines/*-h100*: this toolkit's own build, bench and exporter code run
# on a lent GPU machine that reaches no network and takes at most 64 MiB a call. So the inputs come
# in two calls, packed here first (`bench/device_run.sh pack`): call one carries the llama.cpp
# sources of the pinned sdist (without docs, tests, examples and vocab models: 7 MiB instead of
# 74), the sdist's record of llama.cpp's commit, the Python wheels the machine lacks and the first
# half of the default model; it unpacks them and starts the CUDA build in the background
# (`stage`). Call two carries the model's second half, joins it (the model store checks the
# sha256), waits for the build, and runs bench.all on both workloads with the NVML exporter
# scraped alongside (`run`). On a GPU host with a network none of this is needed:
# `./bootstrap.sh && invoke bench.all`.
# The two calls: `STAGE_WAIT_S=420 bash bench/device_run.sh stage` carrying .devcarry/a (about
# 4-5 min: the CUDA build is ~150 nvcc compilations for sm_90), then within the machine's 30 s of
# idle `BUDGET_S=<device seconds left less 60, at most 560> bash bench/device_run.sh run` carrying
# .devcarry/b; the results come back in $OUT/gpu-results.tgz, run.log and stage.log.
set -uo pipefail
phase=${1:?usage: bench/device_run.sh pack|stage|run}
CARRY=${CARRY:-.devcarry}
OUT=${OUT:-/tmp/device-out}
PY=${PY:-python3}
CACHE=${DGXREADY_CACHE_DIR:-$HOME/.cache/dgxready}
VERSION=0.3.36
MODEL_DIR=$CACHE/models/smollm2-135m/gguf-q4_1
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
FIRST_PART_BYTES=49283072
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/gpu}
export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

pack() {
    local src=$CACHE/llama.cpp/src-$VERSION wheels=$CARRY/a/wheels
    rm -rf "$CARRY" && mkdir -p "$CARRY/a" "$CARRY/b" "$wheels"
    tar -C "$src" --exclude=./docs --exclude=./models --exclude=./tests --exclude=./benches \
        --exclude=./examples --exclude=./pocs --exclude=./media --exclude=./.github \
        --exclude=./gguf-py --exclude=./conversion -cf - . | xz -T0 -6 > "$CARRY/a/llama.cpp-src.tar.xz"
    python3 - "$CACHE/downloads/llama_cpp_python-$VERSION.tar.gz" "$CARRY/a/llama_cpp_python-$VERSION.tar.gz" <<'EOF'
import io, sys, tarfile
name = f"llama_cpp_python-{sys.argv[1].rsplit('-', 1)[1][:-7]}/.git/modules/vendor/llama.cpp/HEAD"
with tarfile.open(sys.argv[1]) as full:
    head = full.extractfile(name).read()
with tarfile.open(sys.argv[2], "w:gz") as small:
    info = tarfile.TarInfo(name)
    info.size = len(head)
    small.addfile(info, io.BytesIO(head))
EOF
    head -c $FIRST_PART_BYTES "$MODEL_DIR/$MODEL_FILE" > "$CARRY/a/model.part1"
    tail -c +$((FIRST_PART_BYTES + 1)) "$MODEL_DIR/$MODEL_FILE" > "$CARRY/b/model.part2"
    # the packages that bench, model and monitoring import and the machine's image lacks
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$wheels" annotated-types==0.8.0 invoke==2.2.1 \
        jsonschema==4.26.0 jsonschema-specifications==2025.9.1 orjson==3.13.0 pydantic==2.14.3 \
        pydantic-core==2.50.4 referencing==0.37.0 rich==15.0.0 rpds-py==2026.9.1 \
        typing-extensions==4.16.0 typing-inspection==0.4.5
    du -sh "$CARRY/a" "$CARRY/b"
}

cuda_root() {
    dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"
}

cuda_lib_dir() {
    dirname "$(ls "$1"/lib*/libcudart.so | head -1)"
}

ensure_cublas() {
    # llama.cpp's CUDA backend links cuBLAS; a toolkit assembled from pip wheels (nvcc and the
    # runtime, as on this workplace's machines) can lack it while the nvidia-cublas wheel beside
    # PyTorch has it.
    local cuda lib wheel f name
    cuda=$(cuda_root)
    [ -e "$cuda/include/cublas_v2.h" ] && return 0
    wheel=$("$PY" -c "import glob, nvidia
print(next(d for p in nvidia.__path__ for d in sorted(glob.glob(p + '/cu*'))
           if glob.glob(d + '/include/cublas_v2.h')))") || { echo "no cuBLAS anywhere"; return 1; }
    lib=$(cuda_lib_dir "$cuda")
    ln -sf "$wheel"/include/cublas*.h "$cuda/include/"
    for f in "$wheel"/lib/libcublas*.so.*; do
        name=${f##*/}
        ln -sf "$f" "$lib/$name"
        ln -sf "$f" "$lib/${name%%.so.*}.so"
    done
    echo "cuBLAS from $wheel linked into $cuda"
}

driver_library() {
    [ -n "${CUDA_DRIVER_LIB:-}" ] && { echo "$CUDA_DRIVER_LIB"; return; }
    ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}' | grep . && return
    ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 \
        /usr/lib64/libcuda.so.1 2>/dev/null | head -1 | grep .
}

ensure_cuda_driver_link() {
    # ggml-cuda links libcuda.so for its virtual-memory pool; CMake looks for it in the toolkit
    # (lib or lib/stubs), where a wheel-made toolkit has none, and the driver ships only .so.1.
    local cuda lib driver f
    cuda=$(cuda_root)
    for f in "$cuda"/lib*/libcuda.so "$cuda"/lib*/stubs/libcuda.so; do
        [ -e "$f" ] && return 0
    done
    driver=$(driver_library) || { echo "no libcuda.so.1 (the NVIDIA driver's library) found"; return 1; }
    lib=$(cuda_lib_dir "$cuda")
    mkdir -p "$lib/stubs" && ln -sf "$driver" "$lib/stubs/libcuda.so"
    echo "the driver's $driver linked as $lib/stubs/libcuda.so"
}

stage() {
    mkdir -p "$OUT" && exec > >(tee -a "$OUT/stage.log") 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    nvcc --version | tail -2
    cmake --version | head -1
    "$PY" --version
    nproc
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$CARRY"/a/wheels/*.whl || exit 1
    mkdir -p "$CACHE/llama.cpp/src-$VERSION" "$CACHE/downloads" "$MODEL_DIR"
    tar -C "$CACHE/llama.cpp/src-$VERSION" -xJf "$CARRY/a/llama.cpp-src.tar.xz" || exit 1
    cp "$CARRY/a/llama_cpp_python-$VERSION.tar.gz" "$CACHE/downloads/"
    cp "$CARRY/a/model.part1" /tmp/model.part1
    ensure_cublas || exit 1
    ensure_cuda_driver_link || exit 1
    setsid nohup "$PY" -c "from model.llamacpp_build import build_llamacpp
b = build_llamacpp()
print('BUILD OK', b.spec.key, b.seconds)" > /tmp/build.out 2>&1 < /dev/null &
    echo $! > /tmp/build.pid
    # wait for the build, up to STAGE_WAIT_S, so that `run` spends its time on the benches
    BUDGET_S=${STAGE_WAIT_S:-420} BENCH_RESERVE_S=0 wait_for_build
    grep -iE "CUDA Toolkit|CUDA_ARCHITECTURES|cublas|error" "$CACHE"/llama.cpp/build-*.log | head -20
}

started=$(date +%s)
seconds_left() { echo $(( ${BUDGET_S:-560} - ($(date +%s) - started) )); }

join_model() {
    local target=$MODEL_DIR/$MODEL_FILE
    cat /tmp/model.part1 "$CARRY/b/model.part2" > "$target.joining" && mv "$target.joining" "$target"
    sha256sum "$target"
}

wait_for_build() {
    local pid
    pid=$(cat /tmp/build.pid)
    while kill -0 "$pid" 2>/dev/null; do
        if (( $(seconds_left) < ${BENCH_RESERVE_S:-200} )); then
            echo "the build is still running with $(seconds_left) s left: no bench"
            return 1
        fi
        echo "$(tail -1 /tmp/build.out) ($(seconds_left) s left)"
        sleep 15
    done
    tail -5 /tmp/build.out
    grep -q "BUILD OK" /tmp/build.out
}

scrape_exporter() {
    mkdir -p "$WORK/scrapes"
    "$PY" -m monitoring.exporter --port 9400 > "$WORK/exporter.log" 2>&1 &
    echo $! > /tmp/exporter.pid
    (while sleep 5; do
        curl -sf http://127.0.0.1:9400/metrics > "$WORK/scrapes/$(date +%s).prom" || true
    done) &
    echo $! > /tmp/scraper.pid
    trap 'kill "$(cat /tmp/scraper.pid)" "$(cat /tmp/exporter.pid)" 2>/dev/null' EXIT
}

bench_all() {
    local name=$1 limit=$2
    shift 2
    echo "== bench.all $name (at most $limit s)"
    timeout --signal=TERM "$limit" "$PY" -c "import sys
from invoke import Context
from bench.tasks import all_
all_(Context(), output_dir='$WORK/$name', full_sweep=True, sweep_requests=${SWEEP_REQUESTS:-64}, $*${BENCH_EXTRA:+, $BENCH_EXTRA})"
    echo "bench.all $name: exit $?"
}

run() {
    mkdir -p "$OUT" "$WORK" && exec > >(tee -a "$OUT/run.log") 2>&1
    join_model || exit 1
    wait_for_build || { cp "$CACHE"/llama.cpp/build-*.log "$OUT/" 2>/dev/null; exit 1; }
    scrape_exporter
    bench_all agents $(( $(seconds_left) - 150 )) "sweep_workload='agents', skip_micro=True"
    if (( $(seconds_left) > 110 )); then
        bench_all synthetic $(( $(seconds_left) - 30 )) "sweep_workload='synthetic', skip_micro=True, skip_capacity=True"
    fi
    curl -sf http://127.0.0.1:9400/metrics > "$WORK/scrapes/final.prom"
    cp "$CACHE"/llama.cpp/*/build.json "$WORK/" 2>/dev/null
    nvidia-smi > "$WORK/nvidia-smi.txt"
    tar -C "$WORK" -czf "$OUT/gpu-results.tgz" . && ls -la "$OUT"
}

"$phase"
