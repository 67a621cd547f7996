"""Studies: grids of ordinary training runs over settings and seeds, with mean ± std and mask stability.

``elanet study studies/table6-distributions.yaml --out DIR`` runs every cell as an ``elanet train``
run under ``DIR/runs/``, is resumable, and writes ``study.csv``, ``study.md`` and figures.
"""
from .results import jaccard, mask_stability, read_run, setting_rows, write_results
from .runner import cell_state, check_out_dir, run_study
from .spec import Cell, Study, load_study

__all__ = ["Cell", "Study", "load_study", "run_study", "check_out_dir", "cell_state", "jaccard", "mask_stability",
           "read_run", "setting_rows", "write_results"]
