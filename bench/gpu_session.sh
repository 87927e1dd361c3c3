#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md, in one run, most wanted first, inside a time
# budget: a borrowed GPU (a lent H100/H200, a spot VM) gives minutes, not hours.
#
#   bash bench/gpu_session.sh OUT_DIR [BUDGET_S]      # default budget 540 s
#
# Needs torch (CUDA), transformers and peft; no DeepSpeed. bitsandbytes only for the
# optional 4-bit memory rows (GPU_SESSION_BASES=full,4bit). Each step writes its JSON
# and log into OUT_DIR, and prints its log's tail; a step that cannot finish within what
# is left of the budget is cut (its JSON keeps the rows written so far, where the
# script writes as it goes) and the next one is still tried if time remains.
set -u
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR [BUDGET_S]}
budget=${2:-540}
bases=${GPU_SESSION_BASES:-full}
shape=${GPU_SESSION_SHAPE:-codegemma-2b}  # tests/test_bench.py runs the whole script at "tiny"
mkdir -p "$out"
out=$(cd "$out" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$here"
start=$(date +%s)

step() {  # step NAME LIMIT_S SCRIPT ARGS...
    local name=$1 limit=$2 left
    shift 2
    left=$((budget - ($(date +%s) - start)))
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, ${left}s of the budget left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): python $*"
    timeout "$limit" python "$@" > "$out/$name.log" 2>&1
    echo "   exit $? after $(($(date +%s) - start))s in all"
    tail -n 45 "$out/$name.log" | grep -v -e '^USDT' -e 'profiler_st'
}

python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
# 1. Where the eager bf16 step's time goes; the loss alone (what the fused loss saves,
#    eager and with its softmax compiled).
step profile 100 profile_step.py --shape "$shape" --out "$out/profile.json"
step loss 90 bench_loss.py --shape "$shape" --compile --out "$out/loss.json"
# 2. The same step compiled, and at a larger micro-batch (MFU grows with the batch).
step profile-compiled 150 profile_step.py --shape "$shape" --compile --out "$out/profile-compiled.json"
step profile-compiled-b16 120 profile_step.py --shape "$shape" --compile --batch 16 \
    --out "$out/profile-compiled-b16.json"
# 3. What the base_hidden routing pass costs on padded and packed instruction-like rows.
step routing 90 bench_routing.py --shape "$shape" --examples 16 --rounds 2 --out "$out/routing.json"
# 4. The benchmark tables: stacked experts vs PEFT and the loop; the memory settings.
step moe 200 bench_moe.py --shape "$shape" --experts 1,4,8 --skip_logits_above 4 --steps 3 \
    --out "$out/moe.json"
step memory 300 bench_memory.py --shape "$shape" --bases "$bases" --compile --steps 5 \
    --time_budget_s 240 --out "$out/memory.json"
echo "== done in $(($(date +%s) - start))s; results in $out"
