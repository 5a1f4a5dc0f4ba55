#!/usr/bin/env bash
# tiny-vqa accuracy through every precision, on a fixed random subset of the easy-vqa test split:
#   bash scripts/measure_tiny_vqa.sh [OUT=out/measure] [N=1000] [FORMATS="fp32 int4 int8 fp16 int4-unfused"]
# MODEL=tiny-vqa-qwen measures the Qwen2.5-VL family's model on the same questions (default MODEL=tiny-vqa).
# Each format: `attanchor-export tiny-vqa` (export + parity + its accuracy gate, peak RSS from
# /usr/bin/time when present), then `attanchor-export eval --json` on the same N questions; fp32 also
# with --compare-torch (PyTorch answers to the same prompt ids and pixels) and without anchors.
# int4-unfused is int4 with --no-ort-fusions: the fused onnxruntime form is then compared with it answer
# by answer (eval --compare).
set -euo pipefail
out="${1:-out/measure}"
n="${2:-1000}"
formats="${FORMATS:-fp32 int4 int8 fp16 int4-unfused}"
model="${MODEL:-tiny-vqa}"
mkdir -p "$out"
timer=()
[ -x /usr/bin/time ] && timer=(/usr/bin/time -v)

for fmt in $formats; do
    case "$fmt" in
        fp32) flags=() ;;
        fp16) flags=(--dtype fp16) ;;
        int4-unfused) flags=(--quant int4 --no-ort-fusions) ;;
        *) flags=(--quant "$fmt") ;;
    esac
    echo "== $fmt: export" >&2
    start=$(date +%s)
    "${timer[@]}" attanchor-export "$model" -o "$out/$fmt" --force --json "${flags[@]}" \
        > "$out/export-$fmt.json" 2> "$out/export-$fmt.log"
    echo "   $(( $(date +%s) - start )) s" >&2
    extra=()
    if [ "$fmt" = fp32 ]; then extra=(--compare-torch); fi
    echo "== $fmt: eval on $n questions" >&2
    attanchor-export eval "$out/$fmt" --data easy-vqa --limit "$n" --json "${extra[@]}" > "$out/eval-$fmt.json"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); r=d['results'][0]; \
print(sys.argv[2], 'accuracy', round(r['accuracy'], 4), {k: round(v['accuracy'], 4) for k, v in r['by_kind'].items()}, \
'anchors/q', round(r['anchors_per_question'], 2), 'loc', r.get('localisation'), 'pytorch', r.get('pytorch'))" \
        "$out/eval-$fmt.json" "$fmt"
done
if [[ " $formats " == *" fp32 "* ]]; then
    echo "== fp32 without anchors (threshold 2)" >&2
    attanchor-export eval "$out/fp32" --data easy-vqa --limit "$n" --threshold 2 --json > "$out/eval-fp32-noanchor.json"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; print('fp32 no anchors', round(r['accuracy'], 4), \
{k: round(v['accuracy'], 4) for k, v in r['by_kind'].items()})" "$out/eval-fp32-noanchor.json"
fi
if [[ " $formats " == *" int4 "* && " $formats " == *" int4-unfused "* ]]; then
    echo "== int4 fused vs int4 standard ops, answer by answer" >&2
    attanchor-export eval "$out/int4" --data easy-vqa --limit "$n" --compare "$out/int4-unfused" --json > "$out/eval-int4-vs-unfused.json"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; \
print('int4 fused', round(r['accuracy'], 4), 'standard ops', round(r['compared']['accuracy'], 4), 'same answers', r['compared']['same_answers'])" \
        "$out/eval-int4-vs-unfused.json"
fi
