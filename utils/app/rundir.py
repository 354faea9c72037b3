"""The output folder of a run."""
from __future__ import annotations

import shutil
from pathlib import Path


def prepare_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to write into a non-empty folder unless --overwrite or --resume says so."""
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise FileExistsError(f"output folder {out} is not empty; pass --resume to continue "
                                  f"the run there or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
