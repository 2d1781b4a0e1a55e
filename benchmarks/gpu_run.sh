#!/usr/bin/env bash
# Every GPU check of the GPU engine in one run, for an H100/H200 host lent for minutes.
#
# On the GPU host (no package index; see docs/benchmarks.md, "GPU check"): carry .gpu/1, then .gpu/2
# (made by gpu-pack, with the benchmarks' own wheels added first:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 psutil tqdm pytest pluggy iniconfig packaging \
#         pygments pytest-asyncio typing-extensions -d .gpu/2/wheels
# ), and run from the repository root:
#
#     bash .gpu/2/setup.sh && export PYTHONPATH=/tmp/site:$PWD
#     OUT=/some/dir bash benchmarks/gpu_run.sh          # results under $OUT
#
# Rehearse it on a CPU machine with QUICK=1 (the CUDA columns then say "not available"
# and the gpu tests are skipped). Each part writes its own files and logs under $OUT, and
# a failing part does not stop the next: the status of each is in $OUT/status.txt.
#
#   1. gpu_check: parity (CUDA vs CPU: copied path with TF32 off and on, resident path),
#      engine steps/s at batch 1, 256, 4096 (copied vs resident, CPU vs CUDA), and
#      1,000,000 idle LSTM sessions resident on the device with the bytes each costs;
#   2. the invariant and pool tests on the CUDA provider (pytest -m gpu);
#   3. end to end: 8 API processes + the engine on CUDA against a bare uvicorn app with 8
#      workers, closed loop and paced at 50% of capacity, resident vs copied states.
set -u
OUT=${OUT:?set OUT to a directory for the results}
QUICK=${QUICK:-0}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
: >"$OUT/status.txt"

part() {  # part NAME COMMAND...: run, log, record the exit status
    local name=$1
    shift
    local started=$SECONDS
    echo "== $name: $*" | tee -a "$OUT/status.txt"
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   $name: exit $rc after $((SECONDS - started)) s" | tee -a "$OUT/status.txt"
    tail -n 40 "$OUT/$name.log"
}

# The CUDA and cuDNN libraries of torch's nvidia-* packages, for every process started
# here (the engine of `nextword serve` included): on the library path.
NVIDIA_LIBS=$("$PYTHON" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = {os.path.dirname(p) for root in nvidia.__path__
        for p in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH=${NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
"$PYTHON" -c "import onnxruntime as ort; print(ort.__version__, ort.get_available_providers())" \
    >"$OUT/providers.txt" 2>&1
cat "$OUT/providers.txt"
missing=$("$PYTHON" -c 'import importlib.util as u; names = "psutil tqdm fastapi uvicorn websockets zmq msgspec onnx".split(); print(" ".join(n for n in names if u.find_spec(n) is None))')
if [ -n "$missing" ]; then
    echo "missing Python packages: $missing (add their wheels to .gpu/2/wheels)" | tee -a "$OUT/status.txt"
    exit 2
fi

if [ "$QUICK" = 1 ]; then
    check_args=(--quick)
    e2e_args=(--quick --workers 1 --clients 2 --sessions 64)
else
    check_args=()
    e2e_args=(--workers 8 --base-workers 8 --clients 8 --sessions 1024 --seconds 6 --warmup 2
              --rounds 1 --retries 0)
fi

part gpu_check "$PYTHON" -m benchmarks.gpu_check --out "$OUT" "${check_args[@]}"
if ! why=$("$PYTHON" -m pytest --version 2>&1); then
    echo "== pytest_gpu: skipped, pytest does not start: $(echo "$why" | tail -n 1)" \
        | tee -a "$OUT/status.txt"
else
    part pytest_gpu env NEXTWORD_PROVIDERS=auto "$PYTHON" -m pytest -q -p no:cacheprovider \
        -m gpu tests/engine/test_engine_gpu.py tests/engine/test_pool.py -rs
fi
part e2e env NEXTWORD_PROVIDERS=auto "$PYTHON" -m benchmarks.bench_e2e \
    --configs lstm,paced --variant copied:NEXTWORD_STATE_POOL=false \
    --json "$OUT/e2e_gpu.json" --log-dir "$OUT/e2e_logs" "${e2e_args[@]}"
cat "$OUT/status.txt"
