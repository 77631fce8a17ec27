#!/usr/bin/env bash
# Runs the shakespeare_mc task of lm-evaluation-harness (its `local-completions` model:
# /v1/completions with echo and logprobs, prompts sent as token ids) against `moe serve`.
#
#   benches/lm_eval/run.sh [CHECKPOINT] [PORT]     # from the repository root
#
# Needs a release build (`cargo build --release`) and `lm_eval[api]` and `transformers`
# in the Python environment (LM_EVAL, default `lm_eval`).
set -euo pipefail
checkpoint=${1:-checkpoints/tiny}
port=${2:-8090}
lm_eval=${LM_EVAL:-lm_eval}
moe=${MOE:-${CARGO_TARGET_DIR:-target}/release/moe}

# lm-eval's tokenizer: the checkpoint's tokenizer.json and tokenizer_config.json (a
# checkpoint older than the chat templates has none: then the one field transformers needs).
tokenizer=$(mktemp -d)
cp "$checkpoint/tokenizer.json" "$tokenizer/"
cp "$checkpoint/tokenizer_config.json" "$tokenizer/" 2> /dev/null ||
  echo '{"tokenizer_class": "PreTrainedTokenizerFast"}' > "$tokenizer/tokenizer_config.json"

"$moe" serve --checkpoint "$checkpoint" --port "$port" &
server=$!
trap 'kill $server; rm -r "$tokenizer"' EXIT
until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
  kill -0 $server 2> /dev/null || { echo "moe serve exited" >&2; exit 1; }
  sleep 0.5
done

window=$(sed -n 's/^max_seq_len = //p' "$checkpoint/config.toml")
"$lm_eval" --model local-completions \
  --model_args "model=moe,base_url=http://127.0.0.1:$port/v1/completions,tokenizer_backend=huggingface,tokenizer=$tokenizer,max_length=$window,num_concurrent=1,max_retries=1" \
  --include_path benches/lm_eval --tasks shakespeare_mc
