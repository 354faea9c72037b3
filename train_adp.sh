#!/usr/bin/env bash
# Train the Attribute Distribution Predictor on extracted h-vectors (the step the original left blank).
set -euo pipefail
cd "$(dirname "$0")"

data=runs/h_digits_pseudo               # folder(s) written by script_extract_he.sh
attributes=parity,magnitude,digit       # heads to train (one checkpoint holds them all)
out=pretrained/digits16_adp.pt
epochs=30
python=${PYTHON:-.venv/bin/python}

"$python" multi_classifier.py --data $data --attributes "$attributes" --out "$out" --epochs "$epochs" "$@"
