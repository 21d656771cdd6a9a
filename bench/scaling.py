"""Fit time of both laws to ~100 points with the full grid of starts (JSON on stdout).

    python bench/scaling.py

Points come from the paper's constants with 0.2% noise: 10 sizes x 10 token counts.
"""

import json
import sys
import time

import numpy as np

from cpt_jax import cli
from cpt_jax import scaling as sc
from cpt_jax.scaling import fit

CLI = cli.Command(__doc__, label="bench error")


def bench() -> None:
    N = np.repeat(np.geomspace(5e7, 5e9, 10), 10)
    D = np.tile(np.geomspace(1e9, 1e11, 10), 10)
    rng = np.random.default_rng(0)
    scratch_L = sc.predict(sc.PAPER_SCRATCH, N, D) * np.exp(rng.normal(0, 0.002, N.shape))
    cpt_L = sc.predict(sc.PAPER_CPT, N, D) * np.exp(rng.normal(0, 0.002, N.shape))
    t0 = time.perf_counter()
    scratch = sc.fit_chinchilla(N, D, scratch_L)
    t1 = time.perf_counter()
    cpt = sc.fit_cpt(N, D, cpt_L, base=scratch)
    t2 = time.perf_counter()
    print(json.dumps({
        "points": len(N), "chinchilla_starts": len(fit.grid(fit.CHINCHILLA_FREE, np.zeros(6))),
        "cpt_starts": len(fit.grid(fit.CPT_FREE, np.zeros(6))),
        "chinchilla_fit_s": round(t1 - t0, 2), "cpt_fit_s": round(t2 - t1, 2), "both_s": round(t2 - t0, 2),
        "chinchilla": {k: round(float(v), 4) for k, v in vars(scratch).items()},
        "cpt": {k: round(float(v), 4) for k, v in vars(cpt).items()},
    }, indent=2))


def main(argv: list[str] | None = None) -> int:
    """`python bench/scaling.py` in this process: the exit code."""
    return CLI.run(bench, argv)


if __name__ == "__main__":
    sys.exit(main())
