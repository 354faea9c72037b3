#!/usr/bin/env bash
# Train the Attribute Distribution Predictor on extracted h-vectors (the step the original left blank).
# Writes runs/digits16_adp.pt (+ .json/.md/.png), never the shipped pretrained/digits16_adp.pt:
#   ./train_adp.sh                              # -> runs/digits16_adp.pt
#   OUT=my/adp.pt ./train_adp.sh                # another checkpoint (or pass --out my/adp.pt)
#   DATA=runs/h_other ./train_adp.sh            # another extraction folder
#   ./train_adp.sh --overwrite                  # replace an earlier runs/digits16_adp.pt
# Use the result with: python main.py --adp runs/digits16_adp.pt ...
set -euo pipefail
cd "$(dirname "$0")"

data=${DATA:-runs/h_digits_pseudo}      # folder(s) written by script_extract_he.sh
attributes=parity,magnitude,digit       # heads to train (one checkpoint holds them all)
out=${OUT:-runs/digits16_adp.pt}        # the checkpoint to write
epochs=30
python=${PYTHON:-.venv/bin/python}

"$python" multi_classifier.py --data $data --attributes "$attributes" --out "$out" --epochs "$epochs" "$@"
