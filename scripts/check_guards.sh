#!/bin/bash
# Breaks each component a headline figure depends on, one at a time, and shows which tests fail
# (the guards of STYLE.md rule 13). Restores every file. ~2 min:  bash scripts/check_guards.sh
set -u
BAK=$(mktemp)
BROKEN=""                 # the file broken at the moment, its original in $BAK ("": none)
restore() {
  if [ -n "$BROKEN" ]; then cp "$BAK" "$BROKEN"; BROKEN=""; fi
}
# every way out (the end, an error, Ctrl-C, kill) puts the broken file back first
trap 'restore; rm -f "$BAK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cd "$(dirname "$0")/.."
run() {
  name="$1"; file="$2"; from="$3"; to="$4"
  cp "$file" "$BAK"
  BROKEN="$file"
  if ! "${PYTHON:-.venv/bin/python}" - "$file" "$from" "$to" <<'PY'
import sys
p, a, b = sys.argv[1:]
s = open(p).read()
if a not in s:
    sys.exit(f"pattern not found in {p}: {a!r}")
open(p, "w").write(s.replace(a, b, 1))
PY
  then
    echo "== STALE guard: $name (update its pattern in scripts/check_guards.sh)"
    restore
    return
  fi
  echo "== broken: $name"
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 "${PYTHON:-.venv/bin/python}" -m pytest -q -p no:cacheprovider tests/test_guidance.py tests/test_balance.py tests/test_check.py tests/test_presets.py tests/test_sd.py tests/test_judge_correction.py tests/test_adp_stream.py tests/test_digits_t2i.py -k "not torchrun and not two_processes and not shipped_default and not t2i_benchmark" 2>&1 | grep -E "^FAILED|passed|failed" | sed 's/ - .*//'
  restore
}
run "running-balance update" utils/guidance/guide.py "            guide.balance.update(self.estimate, self.batch_total, x0, guide.distributed)" "            pass"
run "redraw of checked samples kept" utils/sampling/pipeline.py "        x0[report.redraw] = redo" "        pass"
run "confusion debias" utils/guidance/estimators.py "    return torch.linalg.solve(confusion.to(p_hat), p_hat)" "    return p_hat"
run "refine" utils/guidance/targets.py "    if settings.refine and refine_map:" "    if False:"
run "quota assignment" utils/guidance/estimators.py "    return assign_to_quota(logq, quota_counts(p, len(logq), have, n_have))" "    return logq.argmax(1)"
run "paper temperature 8 -> 1" utils/guidance/settings.py 'estimator="soft", temperature=8.0' 'estimator="soft", temperature=1.0'
run "paper step factor" utils/guidance/settings.py 'step_factor=450.0' 'step_factor=300.0'
run "refine within the model's proportions" utils/guidance/targets.py "            within = priors" "            within = None"
run "tint of the text-conditional training images" models/digits_t2i.py 'return tinted(split.train_x, split.train_y, float(tint))' 'return tinted(split.train_x, split.train_y, 0.0)'
run "CFG: estimate from the conditional rows" utils/guidance/guide.py "        cond = h[n:]" "        cond = h[:n]"
run "judge correction" utils/evaluation/correction.py "    raw = np.linalg.pinv(m_t) @" "    raw = np.eye(len(m_t)) @"
run "refine preserve (untargeted marginals kept)" utils/guidance/targets.py "        if preserve and prior is not None and kept:" "        if False:"
run "each prompt's own class fractions" models/adp.py "        return self.prompt_prior.get(prompt) or self.class_prior" "        return self.class_prior"
run "the empty prompt learns the unconditional prompt's images" utils/data/train_t2i.py "        k = torch.where(drop, own, k)" "        pass"
