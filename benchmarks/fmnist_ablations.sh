#!/usr/bin/env bash
# Short Fashion-MNIST pre-training ablations: each variant of configs/fmnist_pretrain.py
# pre-trains for EPOCHS epochs, then the fast linear probe (logistic regression, cls token)
# and k-NN of its final encoder on all 60k train / 10k test images; one table row each.
#
#   bash benchmarks/fmnist_ablations.sh                     # every variant below
#   bash benchmarks/fmnist_ablations.sh base patch4         # some of them
#
# Environment: WORK=/tmp/fmnist_ablations (runs/<name>, logs/<name>.log), EPOCHS=3, SEED=0,
# PYTHON=python. A variant whose log holds its probe result is not run again.
set -u
cd "$(dirname "$0")/.." || exit 1
WORK=${WORK:-/tmp/fmnist_ablations}
EPOCHS=${EPOCHS:-3}
SEED=${SEED:-0}
PYTHON=${PYTHON:-python}
STEPS=$((EPOCHS * 234))  # 60,000 images / batch 256
mkdir -p "$WORK/runs" "$WORK/logs"

# Each variant: --config.<field>=value flags on top of the pre-training config.
declare -A VARIANT=(
  [base]=""                                       # norm-pix, patch 7, 3 grey copies, decoder 64 x 2
  [in_chans_1]="--config.model.in_chans=1"        # one grey channel instead of 3 copies
  [no_norm_pix]="--config.model.norm_pix_loss=False"
  [decoder_128x4]="--config.model.decoder_embed_dim=128 --config.model.decoder_depth=4"
  [decoder_32x1]="--config.model.decoder_embed_dim=32 --config.model.decoder_depth=1 --config.model.decoder_num_heads=2"
  [patch4]="--config.model.patch_size=4"         # 49 tokens instead of 16: ~3x slower
  [crop_0.5]="--config.data.crop_scale=(0.5,1.0)"
  [no_crop]="--config.data.crop=center"
)
ORDER=(base in_chans_1 no_norm_pix decoder_128x4 decoder_32x1 patch4 crop_0.5 no_crop)
[ $# -gt 0 ] && ORDER=("$@")
PROBE="evals.fewshot.every_steps=0,evals.knn.every_steps=-1,evals.linear.every_steps=-1"
for e in linear knn; do PROBE+=",evals.$e.train_examples=60000,evals.$e.eval_examples=10000"; done

echo "== $(date -u '+%F %T') UTC; $(lscpu | grep 'Model name' | sed 's/  */ /g'); $(nproc) cores;" \
  "$EPOCHS epochs ($STEPS steps) each, seed $SEED"
for name in "${ORDER[@]}"; do
  if [ -z "${VARIANT[$name]+set}" ]; then echo "error: no variant $name (${!VARIANT[*]})"; exit 2; fi
  log="$WORK/logs/$name.log"
  if [ -f "$log" ] && grep -q "linear/top1" "$log"; then echo "== $name: already done"; continue; fi
  args="seed=$SEED,total_steps=$STEPS,warmup_steps=$((STEPS / 20)),$PROBE"
  read -r -a flags <<< "${VARIANT[$name]}"
  echo "== $name: $PYTHON -m mae_jax.main --config=configs/fmnist_pretrain.py:$args ${flags[*]}"
  start=$(date +%s)
  $PYTHON -m mae_jax.main --config="configs/fmnist_pretrain.py:$args" "${flags[@]}" \
    --workdir="$WORK/runs/$name" > "$log" 2>&1 || { echo "== $name FAILED"; tail -20 "$log"; }
  echo "$(( $(date +%s) - start ))" > "$log.wall"
done

echo
echo "| variant | overrides | final loss | img/s | linear probe (cls) | k-NN (cls) | wall s |"
echo "|---|---|---|---|---|---|---|"
for name in "${ORDER[@]}"; do
  log="$WORK/logs/$name.log"
  get() { grep -o "$1 [0-9.]*" "$log" 2>/dev/null | tail -1 | awk '{print $NF}'; }
  ips=$(grep -o '[0-9.]* img/s' "$log" 2>/dev/null | tail -1 | awk '{print $1}')
  echo "| $name | ${VARIANT[$name]:-(none)} | $(get '/[0-9]*  loss') | $ips |" \
    "$(get linear/top1) | $(get knn/top1) | $(cat "$log.wall" 2>/dev/null) |"
done
