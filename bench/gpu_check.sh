#!/usr/bin/env bash
# The device check (issue 15): one script, one GPU, at most 8 minutes. It measures
#   (a) pytest -m cuda: the actor on cuda, bf16/fp16 autocast, boxes on cuda = CPU,
#       GPU decode = CPU decode on JPEGs (tests/pipeline/localize/test_decode.py);
#   (b) bench_model on cuda: SAT / DeiT-S forward time in bf16 at batch 256, img/s of each;
#   (c) bench_localize on cuda: DeiT-S at 224 over ImageNet-like JPEG shards (500x375 q90),
#       the worker's end-to-end img/s against the bare bf16 forward, with CPU decode (all
#       cores) and with GPU decode (nvJPEG);
#   (d) bench_train_step on cuda: DeiT-S at 224 on synthetic 224 px shards for about
#       2 minutes, train img/s through the real input path (DataLoader processes on all
#       cores) against the bare training step with inputs already on the GPU. Through the
#       Ray Train job when Ray is installed; in-process (the same loader and train_epoch a
#       Ray Train worker runs) when it is not, as on the lent H200, whose Python has no Ray
#       and cannot be given one (Ray's wheel, 79 MB, is over what the machine takes).
#
#   bench/gpu_check.sh OUTDIR            # on a GPU machine
#   bench/gpu_check.sh --smoke OUTDIR    # on CPU, tiny sizes, under a minute (a test runs it)
#
# Each step writes its figures as JSON into OUTDIR (cuda_tests.json, forward.json,
# localize.json, train.json); summary.json gathers them with the goals, and is printed.
# A failing step is recorded with its exit status and the check goes on to the next one.
# Python: $PYTHON, else .venv/bin/python if there is one, else python3.
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
if [[ $# -ne 1 ]]; then
    echo "usage: bench/gpu_check.sh [--smoke] OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONUNBUFFERED=1

if [[ $SMOKE == 1 ]]; then
    DEVICE=cpu
    CUDA_TESTS_LIMIT=60
    FORWARD=(--device cpu --only model --batch 2 --rounds 1 --quick --precisions bf16)
    LOCALIZE=(--device cpu --decode both-cpu --worker-only --alone-images 24 --per-shard 8 --batch-size 8
              --imagenet-like --precision bf16)
    TRAIN=(--device cpu --model sat_vit_micro_patch8_64 --image-size 64 --batch-size 8 --images 64
           --seconds 3 --loader-workers 1 --precision fp32 --ray no)
    LIMIT_B=60; LIMIT_C=60; LIMIT_D=60
else
    DEVICE=cuda
    CUDA_TESTS_LIMIT=90
    FORWARD=(--device cuda --only model --batch 256 --rounds 10 --precisions bf16)
    LOCALIZE=(--model sat_deit_small_patch16_224 --device cuda --decode both --precision bf16 --batch-size 256
              --imagenet-like --alone-images 6000 --per-shard 64 --worker-only)
    TRAIN=(--device cuda --model sat_deit_small_patch16_224 --image-size 224 --batch-size 256 --images 8192
           --seconds 100 --loader-workers auto --precision bf16 --ray auto)
    LIMIT_B=60; LIMIT_C=150; LIMIT_D=180  # 8 minutes at most, all four
fi

say() { echo "[gpu_check] $*"; }
declare -A STATUS

say "$(date -u +%FT%TZ) python $($PY -c 'import sys; print(sys.version.split()[0])'), $(nproc) cores," \
    "$($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))')"
# The training loader's slots and fresh segments live in /dev/shm (docs/operations.md, 7).
say "/dev/shm: $(df -h --output=size,avail /dev/shm 2>/dev/null | tail -1 | xargs echo 'size, free:' || echo 'not found')"
if [[ $DEVICE == cuda ]] && ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    say "torch sees no CUDA GPU: run with --smoke on CPU"
    exit 2
fi

# (a) the cuda tests, in the files that have them (others import Ray, which may be missing).
say "(a) pytest -m cuda"
mapfile -t CUDA_FILES < <(grep -rl "pytest.mark.cuda" tests --include='test_*.py' | sort)
timeout "$CUDA_TESTS_LIMIT" $PY -m pytest -q -m cuda -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml" \
    "${CUDA_FILES[@]}"
STATUS[a]=$?
$PY - "$OUT" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
try:
    suite = ET.parse(f"{out}/cuda_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError) as e:
    counts = {"error": f"no junit report: {e}"}
json.dump(counts, open(f"{out}/cuda_tests.json", "w"), indent=1)
EOF
rm -f "$OUT/cuda_tests.xml"

say "(b) bench_model ${FORWARD[*]}"
timeout "$LIMIT_B" $PY bench/bench_model.py "${FORWARD[@]}" --json "$OUT/forward.json"
STATUS[b]=$?

say "(c) bench_localize ${LOCALIZE[*]}"
timeout "$LIMIT_C" $PY bench/bench_localize.py "${LOCALIZE[@]}" --json "$OUT/localize.json"
STATUS[c]=$?

say "(d) bench_train_step ${TRAIN[*]}"
timeout "$LIMIT_D" $PY bench/bench_train_step.py "${TRAIN[@]}" --json "$OUT/train.json"
STATUS[d]=$?

$PY - "$OUT" "$SMOKE" "${STATUS[a]}" "${STATUS[b]}" "${STATUS[c]}" "${STATUS[d]}" <<'EOF'
import json, os, sys
out, smoke, *codes = sys.argv[1:]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
steps = dict(zip("abcd", (int(c) for c in codes)))
s = {"smoke": smoke == "1", "exit_codes": steps, "cuda_tests": load("cuda_tests.json"),
     "forward": load("forward.json"), "localize": load("localize.json"), "train": load("train.json")}
goals = {}
f = (s["forward"] or {}).get("forward", {}).get("bf16")
if f:
    goals["sat_over_deit_forward_bf16"] = {"value": f["sat_over_deit_time"], "goal": "<= 1.05",
                                           "met": f["sat_over_deit_time"] <= 1.05}
for decode, r in ((s["localize"] or {}).get("decode") or {}).items():
    goals[f"localize_{decode}_decode_of_bare_forward"] = {"value": r["of_bare_forward"], "goal": ">= 0.8",
                                                          "met": r["of_bare_forward"] >= 0.8}
t = s["train"]
if t and t.get("of_bare_step") is not None:
    goals["train_of_bare_step"] = {"value": t["of_bare_step"], "goal": ">= 0.9", "met": t["of_bare_step"] >= 0.9}
s["goals"] = goals
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(s, indent=1))
EOF
for step in a b c d; do
    if [[ ${STATUS[$step]} != 0 ]]; then say "step ($step) exited ${STATUS[$step]}"; FAILED=1; fi
done
say "figures in $OUT/summary.json"
exit ${FAILED:-0}
