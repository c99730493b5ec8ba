#!/usr/bin/env bash
# The GPU healing rows and the GPU check on a machine with torch and CUDA but no network (bench/gpu_bundle.py packs
# what it lacks into .gpu/part-1 ... part-N). Each call brings one part beside the working tree; this script stashes
# it in $STASH, and the call that completes the set unpacks the bundle, installs its wheels into $STASH/site and runs
# both, writing their results under $RESULTS (default: $OUT, else runs/gpu).
# TOKENS, BATCH, TASKS, ROWS and MINUTES change the healing rows; PYTHON the interpreter. A CPU trial on a
# development machine: bench/gpu_bundle.py --python-version 3.11, then PYTHON=.venv/bin/python DEVICE=cpu
# TOKENS=2048 BATCH=2 TASKS=8 ROWS=wikitext (teacher text is written 256 samples at a time, for a GPU).
set -euo pipefail
STASH=${STASH:-/tmp/slimllm-gpu}
DEVICE=${DEVICE:-cuda}
TOKENS=${TOKENS:-4194304 16777216}
BATCH=${BATCH:-32}
TASKS=${TASKS:-1000}
MINUTES=${MINUTES:-6}
ROWS=${ROWS:-wikitext|half teacher text}
PYTHON=${PYTHON:-python3}
RESULTS=${RESULTS:-${OUT:-runs/gpu}}
mkdir -p "$STASH" "$RESULTS"
cp .gpu/part-*/bundle.tar.* "$STASH"/ 2>/dev/null || true
expected=$(cat .gpu/part-*/parts 2>/dev/null | head -n 1)
have=$(ls "$STASH"/bundle.tar.* 2>/dev/null | wc -l)
if [ -z "$expected" ]; then
    echo "no .gpu/part-K here: run bench/gpu_bundle.py (make gpu-bundle) and carry one part per call" >&2
    exit 2
fi
if [ "$have" -lt "$expected" ]; then
    echo "stashed $have of $expected parts in $STASH; carry the next part in the next call"
    exit 0
fi
if [ ! -d "$STASH/site" ]; then
    cat "$STASH"/bundle.tar.* | tar -x -C "$STASH"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STASH/site" \
        "$STASH"/wheels/*.whl
fi
export PYTHONPATH="$STASH/site" SLIMLLM_DATA_DIR="$STASH/data/wikitext2" PYTHONUNBUFFERED=1
MODEL=$(ls "$STASH"/model/*.gguf | head -n 1)
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__)"
# Healing rows first (the issue's 4 M and 16 M token budgets), inside the call's 10 minutes with the check after.
IFS='|' read -r -a ROW_NAMES <<< "$ROWS"
# shellcheck disable=SC2086  # TOKENS is a list
"$PYTHON" bench/healing.py --model "$MODEL" --device "$DEVICE" --tokens $TOKENS --batch-size "$BATCH" \
    --generate-batch 256 --hellaswag-tasks "$TASKS" --rows "${ROW_NAMES[@]}" --tag gpu \
    --max-minutes "$MINUTES" --work-dir "$STASH/work" --results-dir "$RESULTS" || echo "healing rows: FAILED ($?)"
"$PYTHON" bench/gpu_check.py --model "$MODEL" --out "$STASH/gpu-check" | tee "$RESULTS/gpu-check.md"
