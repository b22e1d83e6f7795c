#!/usr/bin/env bash
# Run the EXERCISES notebook end to end with every exercise swapped for its reference solution
# (USE_REFERENCE_SOLUTIONS=True), the way an instructor would demo it.
#
#   bash scripts/instructor_demo.sh                 # world from $P3AG_WORLD, else "auto" (toy without a token)
#   bash scripts/instructor_demo.sh --world gemma270m
#   bash scripts/instructor_demo.sh --world gemma --out /tmp/demo
#
# Writes the executed notebook (part3_attribution_graphs_exercises.executed.ipynb) and the dashboards
# (<prompt>/index.html + neuronpedia.json) to out/instructor_demo/ (or --out).
# Needs papermill: `pip install -e ".[dev]"` or `pip install papermill`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORLD="${P3AG_WORLD:-auto}"
OUT="$ROOT/out/instructor_demo"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --world) WORLD="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

# The project's venv when there is one (what `make install` builds), else whatever python is on PATH.
PY="${PYTHON:-python}"
if [[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; fi
if ! "$PY" -c "import papermill, part3_attribution_graphs" 2>/dev/null; then
    echo "$PY cannot import papermill and part3_attribution_graphs: run \`make install\`" \
         "(or pip install -e \".[dev]\")" >&2
    exit 1
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
# papermill with -p USE_REFERENCE_SOLUTIONS True -p WORLD ... -p OUTPUT_DIR ..., through a papermill engine that
# re-polls the kernel every second (see tools/notebook_builder.py, instructor_demo, for why plain papermill can hang).
P3AG_WORLD="$WORLD" "$PY" -m part3_attribution_graphs.tools.notebook_builder --demo "$OUT" --world "$WORLD"
