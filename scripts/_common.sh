# Shared by the experiment scripts: argument parsing, dry runs, skipping finished runs, model depths.
# Usage of every script: SCRIPT MODELS OUT_DIR [--dry-run]   (MODELS: comma-separated; --dry-run anywhere)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
USAGE="usage: $0 ${SCRIPT_ARGS:-MODELS OUT_DIR (MODELS comma-separated, e.g. facebook/opt-6.7b,meta-llama/Llama-2-7b-hf)} [--dry-run]"
DRY_RUN=0
POSITIONAL=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -*) echo "error: unknown option $arg; $USAGE" >&2; exit 2 ;;
    *) POSITIONAL+=("$arg") ;;
  esac
done
# A script with other arguments than MODELS OUT_DIR sets SCRIPT_ARGS, SCRIPT_MIN_ARGS and SCRIPT_MAX_ARGS.
if [ "${#POSITIONAL[@]}" -lt "${SCRIPT_MIN_ARGS:-2}" ] || [ "${#POSITIONAL[@]}" -gt "${SCRIPT_MAX_ARGS:-2}" ]; then
  echo "$USAGE" >&2
  exit 2
fi
if [ -z "${SCRIPT_ARGS:-}" ]; then
  IFS=, read -r -a MODELS <<< "${POSITIONAL[0]}"
  OUT="${POSITIONAL[1]}"
fi
DRY_FLAG=()
[ "$DRY_RUN" = 1 ] && DRY_FLAG=(--dry-run)
PY="${PYTHON:-python}"

# Number of decoder blocks: the paper's models by name, anything else from its config.
depth_of() {
  case "$1" in
    facebook/opt-6.7b|meta-llama/Llama-2-7b-hf) echo 32 ;;
    facebook/opt-13b|meta-llama/Llama-2-13b-hf) echo 40 ;;
    facebook/opt-30b) echo 48 ;;
    facebook/opt-66b) echo 64 ;;
    meta-llama/Llama-2-70b-hf) echo 80 ;;
    *) "$PY" -c "import sys; from sleb.models import load_config, config_depth; print(config_depth(load_config(sys.argv[1])[1]))" "$1" ;;
  esac
}

# Blocks to remove for a percentage of the depth, rounded up as the paper does (20% of 32 = 7).
remove_count() { echo $(( ($1 * $2 + 99) / 100 )); }

slug() { basename "$1" | tr -c 'A-Za-z0-9._\n-' '_'; }

# run RESULT_FILE COMMAND...: print the command; run it unless dry or its result exists.
run() {
  local result="$1"; shift
  printf '%q ' "$@"; echo
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  if [ -f "$OUT/$result" ]; then echo "  (skipped: $OUT/$result exists)"; return 0; fi
  "$@"
}
