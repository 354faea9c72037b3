"""Train an h-space classifier for a single attribute (an ADP with one head set).

    python h_classification.py --data runs/h_gender --attribute gender --out pretrained/gender_adp.pt

Same training and checkpoint as multi_classifier.py, restricted to one attribute; the
checkpoint is used for sample guidance and distribution guidance alike.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from multi_classifier import build_parser, run  # noqa: E402
from utils.app.cli import guarded  # noqa: E402


@guarded
def main(argv: list[str] | None = None) -> int:
    args = build_parser(single=True).parse_args(argv)
    return run(args, [args.attribute])


if __name__ == "__main__":
    raise SystemExit(main())
