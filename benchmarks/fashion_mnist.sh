#!/usr/bin/env bash
# MAE on Fashion-MNIST end to end on CPU: idx -> image folders, MAE pre-training, then
# linear probe / fine-tune from MAE vs from random init (all labels and 1% of them).
#
#   nohup bash benchmarks/fashion_mnist.sh > /tmp/fmnist/bench.log 2>&1 &
#
# Environment (defaults sized for ~45 minutes on 2 shared CPU cores, see benchmarks/RESULTS.md):
#   WORK=/tmp/fmnist      image folders, runs/<name> workdirs, logs/<name>.log
#   FASHION=/usr/share/datasets/fashion-mnist   the idx .gz files
#   PRE_STEPS LP_STEPS FT_STEPS FEW_STEPS       steps of pre-training / linear probe /
#                                               fine-tune (60k labels) / fine-tune (600 labels)
#   LP_LR                                       linear-probe LARS base_lr
# A run whose log already holds its final result is skipped, so a rerun resumes the table.
# Each training process is killed (by its pid) once its final checkpoint is logged: on this
# machine it otherwise idles ~1.5 minutes at exit after its last line (see RESULTS.md).
set -u
cd "$(dirname "$0")/.." || exit 1
WORK=${WORK:-/tmp/fmnist}
FASHION=${FASHION:-/usr/share/datasets/fashion-mnist}
PRE_STEPS=${PRE_STEPS:-1000}
LP_STEPS=${LP_STEPS:-250}
FT_STEPS=${FT_STEPS:-250}
FEW_STEPS=${FEW_STEPS:-100}
LP_LR=${LP_LR:-6.4}
PYTHON=${PYTHON:-python}
mkdir -p "$WORK/runs" "$WORK/logs"
T0=$(date +%s)

echo "== $(date -u '+%F %T') UTC; $(lscpu | grep 'Model name' | sed 's/  */ /g'); $(nproc) cores"
echo "== PRE_STEPS=$PRE_STEPS LP_STEPS=$LP_STEPS FT_STEPS=$FT_STEPS FEW_STEPS=$FEW_STEPS" \
  "LP_LR=$LP_LR"

# (a) idx -> image folders (idempotent: existing PNGs are kept).
convert() {  # split out [per_class]
  $PYTHON -m mae_jax.data.idx --images="$FASHION/$1-images-idx3-ubyte.gz" \
    --labels="$FASHION/$1-labels-idx1-ubyte.gz" --out="$WORK/$2" ${3:+--per_class=$3} || exit 1
}
t=$(date +%s)
convert train train; convert t10k test; convert train train_1pct 60
echo "== data ready in $(( $(date +%s) - t ))s"

declare -A WALL
# train NAME STEPS MARKER CONFIG: one `python -m mae_jax.main` run, logged to logs/NAME.log.
train() {
  local name=$1 steps=$2 marker=$3 config=$4
  local log="$WORK/logs/$name.log" workdir="$WORK/runs/$name" start pid
  if [ -f "$log" ] && grep -q "checkpoint of step $steps in" "$log"; then
    echo "== $name: already done ($log)"; WALL[$name]=$(cat "$log.wall" 2>/dev/null || echo "?")
    return
  fi
  echo "== $name: python -m mae_jax.main --config=$config --workdir=$workdir"
  start=$(date +%s)
  $PYTHON -m mae_jax.main --config="$config" --workdir="$workdir" > "$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if grep -q "$marker" "$log"; then
      sleep 3  # finished: its checkpoint is complete (logged after the manager's close)
      kill -9 "$pid" 2>/dev/null  # SIGTERM would only ask for a preemption checkpoint
      break
    fi
    sleep 3
  done
  wait "$pid" 2>/dev/null
  WALL[$name]=$(( $(date +%s) - start )); echo "${WALL[$name]}" > "$log.wall"
  if ! grep -q "checkpoint of step $steps in" "$log"; then
    echo "== $name FAILED after ${WALL[$name]}s; log tail:"; tail -30 "$log"
  fi
  grep -E "img/s|eval/top1" "$log" | tail -3
}

top1() {  # the last eval/top1 of a run's log
  grep -o "eval/top1 [0-9.]*" "$WORK/logs/$1.log" 2>/dev/null | tail -1 | cut -d' ' -f2
}

CLS=configs/fmnist_classify.py
MAE="$WORK/runs/mae"
SETS="folder=$WORK/train,eval_folder=$WORK/test"
FEW="folder=$WORK/train_1pct,eval_folder=$WORK/test"

# (b) MAE pre-training on the 60k training images (labels unused).
PRE="folder=$WORK/train,total_steps=$PRE_STEPS,warmup_steps=$((PRE_STEPS / 20))"
train mae "$PRE_STEPS" "wrote .*reconstructions.png" "configs/fmnist_pretrain.py:$PRE"
# (c) linear probe: MAE encoder vs a random-init encoder (same probe).
LP="total_steps=$LP_STEPS,warmup_steps=$((LP_STEPS / 10)),base_lr=$LP_LR,eval_every=-1"
END="checkpoint of step $LP_STEPS in"
train linprobe_mae "$LP_STEPS" "$END" "$CLS:mode=linprobe,$SETS,$LP,init_from=$MAE"
train linprobe_random "$LP_STEPS" "$END" "$CLS:mode=linprobe,$SETS,$LP"
# (d) fine-tune from MAE, (e) the same budget from random init.
FT="total_steps=$FT_STEPS,warmup_steps=$((FT_STEPS / 10)),eval_every=-1"
END="checkpoint of step $FT_STEPS in"
train finetune_mae "$FT_STEPS" "$END" "$CLS:mode=finetune,$SETS,$FT,init_from=$MAE"
train finetune_scratch "$FT_STEPS" "$END" "$CLS:mode=scratch,$SETS,$FT"
# (f) 1% of the labels (60 per class = 600 images): fine-tune from MAE vs from scratch.
F1="total_steps=$FEW_STEPS,warmup_steps=$((FEW_STEPS / 10)),eval_every=-1"
END="checkpoint of step $FEW_STEPS in"
train few_mae "$FEW_STEPS" "$END" "$CLS:mode=finetune,$FEW,$F1,init_from=$MAE"
train few_scratch "$FEW_STEPS" "$END" "$CLS:mode=scratch,$FEW,$F1"

echo
echo "== Fashion-MNIST test top-1 (10k images), total wall $(( $(date +%s) - T0 ))s"
printf "| %-16s | %-10s | %-8s | %6s | %7s | %7s |\n" run init labels steps top1 wall_s
printf "|%s|%s|%s|%s|%s|%s|\n" ------------------ ------------ ---------- -------- --------- \
  ---------
row() {
  printf "| %-16s | %-10s | %-8s | %6s | %7s | %7s |\n" "$1" "$2" "$3" "$4" "${5:--}" \
    "${WALL[$1]:-?}"
}
LOSS=$(grep -o 'loss [0-9.]*' "$WORK/logs/mae.log" | tail -1 | cut -d' ' -f2)
row mae "random" "none" "$PRE_STEPS" "(loss $LOSS)"
row linprobe_mae MAE 60k "$LP_STEPS" "$(top1 linprobe_mae)"
row linprobe_random random 60k "$LP_STEPS" "$(top1 linprobe_random)"
row finetune_mae MAE 60k "$FT_STEPS" "$(top1 finetune_mae)"
row finetune_scratch random 60k "$FT_STEPS" "$(top1 finetune_scratch)"
row few_mae MAE 600 "$FEW_STEPS" "$(top1 few_mae)"
row few_scratch random 600 "$FEW_STEPS" "$(top1 few_scratch)"
