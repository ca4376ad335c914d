#!/usr/bin/env bash
# MAE on Fashion-MNIST end to end on CPU, one script: MAE pre-training on the 60k training
# images (labels unused); the fast linear probe (cls and mean-pool) and k-NN of the final
# checkpoint; the official linear probe (BN + linear, LARS, cls token); fine-tuning from MAE
# and the same budget from random init; 1% of the labels (60 per class) from MAE and from
# random init. Every accuracy is top-1 on the 10k test images.
#
#   apt-get install dataset-fashion-mnist        # Debian (MIT): the idx files below
#   bash benchmarks/fashion_mnist.sh             # ~75 minutes on 2 idle CPU cores
#   SEED=1 WORK=/tmp/fmnist_seed1 bash benchmarks/fashion_mnist.sh   # the second seed
#
# The images are read from the idx files into host memory (data.dataset=arrays, no PNG).
# Environment (defaults: benchmarks/RESULTS.md's run):
#   WORK=/tmp/fmnist     runs/<name> workdirs, logs/<name>.log, evals/<name>.json
#   SEED=0               config.seed of every run (masks, init, data order, augmentation)
#   PRE_EPOCHS=30 LP_EPOCHS=10 FT_EPOCHS=12   epochs of pre-training / official linear probe /
#                        fine-tuning (MAE and from scratch, the same budget)
#   FEW_STEPS=200        steps of the 1%-label runs (batch 256 of the 600 images)
#   EPOCH=234            steps per "epoch" above (e.g. EPOCH=10 FEW_STEPS=10: a smoke test)
#   PYTHON=python
# A run whose log already holds its final checkpoint is skipped, so a rerun resumes the table.
set -u
cd "$(dirname "$0")/.." || exit 1
WORK=${WORK:-/tmp/fmnist}
SEED=${SEED:-0}
PRE_EPOCHS=${PRE_EPOCHS:-30}
LP_EPOCHS=${LP_EPOCHS:-10}
FT_EPOCHS=${FT_EPOCHS:-12}
FEW_STEPS=${FEW_STEPS:-200}
PYTHON=${PYTHON:-python}
EPOCH=${EPOCH:-234}  # steps of one epoch: 60,000 images / batch 256 (smaller: a smoke test)
PRE=$((PRE_EPOCHS * EPOCH)) LP=$((LP_EPOCHS * EPOCH)) FT=$((FT_EPOCHS * EPOCH))
mkdir -p "$WORK/runs" "$WORK/logs" "$WORK/evals"
T0=$(date +%s)
echo "== $(date -u '+%F %T') UTC; $(lscpu | grep 'Model name' | sed 's/  */ /g'); $(nproc) cores"
echo "== SEED=$SEED PRE_EPOCHS=$PRE_EPOCHS ($PRE steps) LP_EPOCHS=$LP_EPOCHS ($LP)" \
  "FT_EPOCHS=$FT_EPOCHS ($FT) FEW_STEPS=$FEW_STEPS"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "error: no Fashion-MNIST idx files in /usr/share/datasets/fashion-mnist" \
    "(apt-get install dataset-fashion-mnist)"; exit 2
fi

declare -A WALL
# train NAME STEPS CONFIG: one `python -m mae_jax.main` run, logged to logs/NAME.log.
train() {
  local name=$1 steps=$2 config=$3 log="$WORK/logs/$1.log" start
  if [ -f "$log" ] && grep -q "checkpoint of step $steps in" "$log"; then
    echo "== $name: already done ($log)"; WALL[$name]=$(cat "$log.wall" 2>/dev/null || echo "?")
    return
  fi
  echo "== $name: $PYTHON -m mae_jax.main --config=$config --workdir=$WORK/runs/$name"
  start=$(date +%s)
  $PYTHON -m mae_jax.main --config="$config" --workdir="$WORK/runs/$name" > "$log" 2>&1
  WALL[$name]=$(( $(date +%s) - start )); echo "${WALL[$name]}" > "$log.wall"
  if ! grep -q "checkpoint of step $steps in" "$log"; then
    echo "== $name FAILED after ${WALL[$name]}s; log tail:"; tail -20 "$log"; exit 1
  fi
  grep -E "img/s|eval/top1|PSNR" "$log" | tail -2
}

# probe NAME POOL [--checkpoint=... | --random_init]: the fast linear probe (and k-NN)
# of the frozen encoder on all 60k train / 10k test images, to evals/NAME.json.
PROBES="--config.evals.fewshot.every_steps=0 --config.evals.linear.every_steps=-1"
for e in linear knn; do PROBES+=" --config.evals.$e.train_examples=60000"; done
for e in linear knn; do PROBES+=" --config.evals.$e.eval_examples=10000"; done
probe() {
  local name=$1 pool=$2 start; shift 2
  local out="$WORK/evals/$name.json" log="$WORK/logs/$name.log"
  if [ -f "$out" ]; then echo "== $name: already done ($out)"; return; fi
  echo "== $name: $PYTHON -m mae_jax.evaluate --config=configs/fmnist_pretrain.py $* (pool $pool)"
  start=$(date +%s)
  # shellcheck disable=SC2086  # PROBES is a list of flags
  $PYTHON -m mae_jax.evaluate --config=configs/fmnist_pretrain.py:seed=$SEED $PROBES \
    --config.evals.linear.pool="$pool" --config.evals.knn.pool="$pool" "$@" --out="$out" \
    > "$log" 2>&1 || { echo "== $name FAILED; log tail:"; tail -20 "$log"; exit 1; }
  WALL[$name]=$(( $(date +%s) - start ))
  grep -E "top1" "$log" | tail -2
}

CLS=configs/fmnist_classify.py
MAE="$WORK/runs/mae"
# (a) MAE pre-training (the pictures: the first test images, masked-patch PSNR logged).
train mae "$PRE" "configs/fmnist_pretrain.py:seed=$SEED,total_steps=$PRE,warmup_steps=$((PRE / 20)),evals.fewshot.every_steps=0,evals.knn.every_steps=0"
# (b) fast linear probe + k-NN: MAE encoder (cls, mean-pool) and the random-init encoder.
probe fast_cls cls "--checkpoint=$MAE"
probe fast_mean mean "--checkpoint=$MAE"
probe fast_random_cls cls --random_init
# (c) the official linear probe: BatchNorm + linear head, LARS, cls token, frozen encoder.
train linprobe "$LP" "$CLS:mode=linprobe,seed=$SEED,total_steps=$LP,warmup_steps=$((LP / 10)),eval_every=-1,init_from=$MAE"
# (d) fine-tune from MAE, (e) the same recipe and budget from random init (eval each epoch).
FTA="seed=$SEED,total_steps=$FT,warmup_steps=$((FT / 10)),eval_every=$EPOCH"
train finetune_mae "$FT" "$CLS:mode=finetune,$FTA,init_from=$MAE"
train finetune_scratch "$FT" "$CLS:mode=scratch,$FTA"
# (f) 1% of the labels (data.per_class=60: 600 images, the seed-0 subset of mae_jax.data.idx).
FEWA="seed=$SEED,data.per_class=60,total_steps=$FEW_STEPS,warmup_steps=$((FEW_STEPS / 10)),eval_every=-1"
train few_mae "$FEW_STEPS" "$CLS:mode=finetune,$FEWA,init_from=$MAE"
train few_scratch "$FEW_STEPS" "$CLS:mode=scratch,$FEWA"

top1() {  # the last eval/top1 of a run's log
  grep -o "eval/top1 [0-9.]*" "$WORK/logs/$1.log" 2>/dev/null | tail -1 | cut -d' ' -f2
}
metric() {  # metric NAME KEY: a value of evals/NAME.json
  $PYTHON -c "import json,sys; print('%.4f' % json.load(open(sys.argv[1]))['metrics'][sys.argv[2]])" \
    "$WORK/evals/$1.json" "$2" 2>/dev/null || echo "-"
}
echo
echo "== Fashion-MNIST test top-1 (10k images), seed $SEED, total wall $(( $(date +%s) - T0 ))s"
echo "| run | init | labels | steps | test top-1 | wall s |"
echo "|---|---|---|---|---|---|"
row() { echo "| $1 | $2 | $3 | $4 | ${5:--} | ${WALL[$6]:-?} |"; }
LOSS=$(grep -o 'loss [0-9.]*' "$WORK/logs/mae.log" | tail -1 | cut -d' ' -f2)
PSNR=$(grep -o 'PSNR .*' "$WORK/logs/mae.log" | tail -1)
row "MAE pre-training" random none "$PRE" "(loss $LOSS; $PSNR)" mae
row "fast linear probe, cls" MAE 60k "L-BFGS" "$(metric fast_cls linear/top1)" fast_cls
row "fast linear probe, mean-pool" MAE 60k "L-BFGS" "$(metric fast_mean linear/top1)" fast_mean
row "fast linear probe, cls" random 60k "L-BFGS" "$(metric fast_random_cls linear/top1)" \
  fast_random_cls
row "k-NN (k=20), cls" MAE 60k "-" "$(metric fast_cls knn/top1)" fast_cls
row "k-NN (k=20), mean-pool" MAE 60k "-" "$(metric fast_mean knn/top1)" fast_mean
row "linear probe (official: BN + LARS, cls)" MAE 60k "$LP" "$(top1 linprobe)" linprobe
row "fine-tune" MAE 60k "$FT" "$(top1 finetune_mae)" finetune_mae
row "fine-tune from scratch" random 60k "$FT" "$(top1 finetune_scratch)" finetune_scratch
row "fine-tune, 1% labels" MAE 600 "$FEW_STEPS" "$(top1 few_mae)" few_mae
row "from scratch, 1% labels" random 600 "$FEW_STEPS" "$(top1 few_scratch)" few_scratch
