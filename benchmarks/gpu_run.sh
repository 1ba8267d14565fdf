#!/usr/bin/env bash
# The accuracy push (issue: beat published FER2013 results, distil into the bundled models) in ONE command on a GPU.
# Usage (repository root, ferkit installed, fer2013 at $DATA or packed as .carry/fer2013.tgz):
#   OUT=/tmp/out bash benchmarks/gpu_run.sh
# Writes $OUT/results.json (every row of benchmarks/recipes.md) and $OUT/{fer3,fer7}.safetensors (the students).
set -euo pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
DATA=${DATA:-../shared/data/fer2013}
if [ ! -d "$DATA" ] && [ -f .carry/fer2013.tgz ]; then mkdir -p /tmp/data && tar xzf .carry/fer2013.tgz -C /tmp/data; DATA=/tmp/data/fer2013; fi
F="python3 -m ferkit"
R=runs/gpu
run() { echo "+ $*" | tee -a "$OUT/commands.txt"; "$@" 2>&1 | tail -3; }
# 1. Seven classes, one model: the deep VGG-style CNN, accurate recipe (bf16, channels_last, cache on the GPU).
for s in 0 1 2; do
  run $F train --data "$DATA" --classes all --recipe accurate --seed $s --out $R/vgg7-s$s --set compile=true
done
run $F train --data "$DATA" --classes all --recipe accurate --model resnet18 --out $R/res7 --set compile=true
# 2. Happy/sad/neutral, one model.
run $F train --data "$DATA" --recipe accurate --out $R/vgg3 --set compile=true
run $F train --data "$DATA" --recipe accurate --model resnet18 --out $R/res3 --set compile=true
# 3. Ensembles, plain and with test-time augmentation.
for t in none flip tencrop; do
  $F evaluate --model $R/vgg7-s0 --data "$DATA" --split validation --classes all --tta $t --json > "$OUT/eval_vgg7_$t.json"
  $F evaluate --model $R/vgg7-s0,$R/vgg7-s1,$R/vgg7-s2,$R/res7 --data "$DATA" --split validation --tta $t --json \
    > "$OUT/eval_ens7_$t.json"
  $F evaluate --model $R/vgg3 --data "$DATA" --split validation --tta $t --json > "$OUT/eval_vgg3_$t.json"
done
# 5. Distil the ensembles into the fast CPU students that ship as fer7 / fer3.
run $F distill --teacher $R/vgg7-s0,$R/vgg7-s1,$R/vgg7-s2,$R/res7 --student fastcnn --data "$DATA" --classes all \
  --epochs 120 --batch-size 256 --lr 0.004 --out $R/fer7
run $F distill --teacher $R/vgg3,$R/res3 --student fastcnn --data "$DATA" --epochs 120 --batch-size 256 --lr 0.004 \
  --out $R/fer3
for m in fer3 fer7; do
  $F evaluate --model $R/$m --data "$DATA" --split validation --json > "$OUT/eval_$m.json"
  cp $R/$m/model.safetensors "$OUT/$m.safetensors"
done
python3 - "$OUT" $R <<'PY'
import json, sys, pathlib
out, runs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
res = {d.name: json.loads((d / "metrics.json").read_text()) for d in runs.iterdir() if (d / "metrics.json").exists()}
rows = {k: {"accuracy": v.get("plain_accuracy"), "tta": v.get("tta"), "accuracy_tta": v["final"]["accuracy"],
            "train_seconds": v.get("train_seconds"), "images_per_second": v.get("images_per_second")}
        for k, v in res.items() if "final" in v}
evals = {p.stem: json.loads(p.read_text())["accuracy"] for p in out.glob("eval_*.json")}
(out / "results.json").write_text(json.dumps({"runs": rows, "evaluate": evals}, indent=2))
print(json.dumps({"runs": rows, "evaluate": evals}, indent=2))
PY
