#!/usr/bin/env bash
# The last call on a lent GPU machine (results/gpu/README.md): install the kit (.whl/, and SmolLM2 where both of its
# chunks were kept by earlier calls) into /tmp/site, then run scripts/gpu_check.py from the repository root with
# /tmp/site first on PYTHONPATH (the project is not installed). Arguments go to gpu_check.py (e.g. --skip cell).
# The report and kit.log go to $OUT, which the run tool brings back. Exit: gpu_check.py's, or 5 if the kit did not
# install. PYTHON (default python3) and GPU_KIT_SITE (default /tmp/site) may be set; the tests set both.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-results/gpu}
SITE=${GPU_KIT_SITE:-/tmp/site}
mkdir -p "$OUT"
# no network there: never try the hub; the converted SmolLM2 goes to a scratch cache
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export LORAN_CACHE=${LORAN_CACHE:-/tmp/loran-cache}
"$PY" scripts/gpu_kit.py install --target "$SITE" >"$OUT/kit.log" 2>&1
kit=$?
cat "$OUT/kit.log"
if [ "$kit" -ne 0 ]; then
  echo "gpu-device-run: the kit did not install (exit $kit); gpu_check.py not run"
  exit 5
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" scripts/gpu_check.py --out "$OUT" --commit "$(cat .whl/COMMIT 2>/dev/null || echo unknown)" "$@"
code=$?
echo "gpu-device-run: gpu_check.py exit $code"
exit "$code"
