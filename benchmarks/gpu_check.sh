#!/usr/bin/env bash
# GPU check, from the repo root on a CUDA machine: the default DAG's stages on the GPU (one rank per
# GPU; SRVAR with train.compile), timed, then benchmarks/gpu_check.py (KV cache on CUDA, SDPA
# kernels, VAR-d16 bf16 step and sampling, torch.compile). Needs the package's dependencies
# importable (src/ is put on PYTHONPATH). Timings and metrics go to $OUT (default: a temp folder).
#
#   SHARDS=path/to/data/shards bash benchmarks/gpu_check.sh   # reuse shards (else the shard stage runs)
#   MAX_STEPS=30 MICRO=0 bash benchmarks/gpu_check.sh           # quick: short training, no VAR-d16 part
set -euo pipefail
ROOT=$PWD
OUT=${OUT:-$(mktemp -d)}
export WANDB_MODE=${WANDB_MODE:-disabled} PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
WORK=$(mktemp -d)
cp params.yaml "$WORK/"
cd "$WORK"
NGPU=$(python -c 'import torch; print(torch.cuda.device_count())')
python - "$NGPU" "${MAX_STEPS:-0}" <<'EOF'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
for s in ("vqvae", "srvar", "mar"):
    p["resources"][f"train_{s}"]["nproc"] = int(sys.argv[1])
p["resources"]["train_srvar"]["compile"] = True
if int(sys.argv[2]):
    for s in ("vqvae", "srvar", "mar"):
        t = p[s]["train"]
        t.update(max_steps=int(sys.argv[2]), warmup_steps=1, val_every=int(sys.argv[2]), ckpt_every=10**6)
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
EOF
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [[ -n ${SHARDS:-} ]]; then mkdir -p data && cp -r "$SHARDS" data/shards; fi
stages=("launch train_vqvae" tokenize "launch train_srvar" "launch train_mar" evaluate report)
[[ -n ${SHARDS:-} ]] || stages=(shard "${stages[@]}")
for st in "${stages[@]}"; do
    t0=$(date +%s%N)
    log="$WORK/${st// /_}.log"
    python -m arsr.stages.$st >"$log" 2>&1 || { tail -40 "$log"; exit 1; }
    grep -E "val|evaluate \[" "$log" | tail -2 || true
    echo "$st $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/stage_times.txt"
done
cp eval/metrics.json "$OUT/metrics.json"
python -c 'import json; [print(d, m, v) for d, r in json.load(open("eval/metrics.json")).items() for m, v in r.items()]'
cd "$ROOT"
[[ ${MICRO:-1} == 0 ]] || python benchmarks/gpu_check.py --json "$OUT/gpu_check.json"
