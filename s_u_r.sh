#!/usr/bin/env bash
# Generate images: vanilla, sample-guided or distribution-guided (the original's s_u_r.sh flags).
# Edit the variables below; runs on the embedded digits model as it stands.
set -euo pipefail
cd "$(dirname "$0")"

config=configs/digits16.yml     # model preset (see configs/ and the README's checkpoint table)
exp=runs/s_u_r                  # output folder
n_test_img=200                  # images to generate
attribute_list=1,0,0            # one switch per ADP attribute (digits: parity,magnitude,digit)
scale=""                        # guidance scale; empty = the config's default
vanilla_generation=False        # True: plain DDIM sampling
sample=False                    # True: sample guidance (each image to class $male)
bs_test=100                     # batch size: distribution guidance balances each batch
male=0.5                        # sample: class index; distribution: fraction of class 1
seed=0                          # first seed (image k uses seed+k): runs are reproducible
overwrite=""                    # --overwrite: replace an earlier run in $exp (only a run's own files);
                                # --resume: continue it; empty: refuse a non-empty $exp
python=${PYTHON:-.venv/bin/python}

"$python" main.py --config "$config" --exp "$exp" --n_test_img "$n_test_img" \
    --attribute_list "$attribute_list" ${scale:+--scale "$scale"} \
    --vanilla_generation "$vanilla_generation" --sample "$sample" --bs_test "$bs_test" \
    --male "$male" --seed "$seed" --evaluate ${overwrite:+"$overwrite"} "$@"
