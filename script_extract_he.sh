#!/usr/bin/env bash
# Extract h-vectors for training h-classifiers (the original's script_extract_he.sh flags).
#   mode=folders: DDIM-invert every image of test_path_one/<class>/ and record h at every step
#   mode=pseudo : sample n images, record h at every step, label the images with a classifier
set -euo pipefail
cd "$(dirname "$0")"

config=configs/digits16.yml
mode=pseudo                     # folders | pseudo
just_precompute=True            # (folders) the original flag: extraction only, no generation
test_path_one=data/gender       # (folders) one sub-folder of images per class, e.g. male/ female/
attribute=gender                # (folders) the attribute the sub-folders are classes of
n=2000                          # (pseudo) number of samples
labeller=digits_svc             # (pseudo) digits_svc, or a judge file (.pt / .onnx + .json)
savepath=runs/h_digits_pseudo   # output folder (resumable: finished shards are kept)
bs=100
python=${PYTHON:-.venv/bin/python}

if [ "$mode" = folders ]; then
    "$python" main.py --config "$config" --just_precompute "$just_precompute" \
        --test_path_one "$test_path_one" --attribute "$attribute" --savepath "$savepath" --bs_test "$bs" "$@"
else
    "$python" main.py --config "$config" --extract_pseudo "$n" --labeller "$labeller" \
        --savepath "$savepath" --bs_test "$bs" "$@"
fi
