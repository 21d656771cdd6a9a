"""Time of the forgetting law's fit and its bootstrap, as a replay sweep's report runs them (JSON
on stdout).

    python bench/replay.py [--resamples 200]

Points come from known constants (K 0.8, kappa 0.3, r0 0.02, rho 1.2) with 5% noise: five replay
ratios x four target-token budgets spanning 8x, as tests/test_replay.py fits them.
"""

import json
import sys
import time

import numpy as np
from absl import flags

from cpt_jax import cli
from cpt_jax.scaling import replay as rp

CLI = cli.Command(__doc__, label="bench error")
_RESAMPLES = flags.DEFINE_integer("resamples", 200, "Refits on resampled points.", flag_values=CLI.flags)

TRUE = rp.ReplayFit(K=0.8, kappa=0.3, r0=0.02, rho=1.2)


def bench() -> None:
    r = np.tile([0.0, 0.01, 0.05, 0.2, 0.5], 4)
    d = np.repeat(1e6 * np.array([1.0, 2.0, 4.0, 8.0]), 5)
    rise = rp.predict_rise(TRUE, r, d) * np.exp(np.random.default_rng(0).normal(0, 0.05, r.shape))
    t0 = time.perf_counter()
    fit = rp.fit_replay(r, d, rise)
    t1 = time.perf_counter()
    b = rp.bootstrap(r, d, rise, epsilon=0.1, at_tokens=8e6, n=_RESAMPLES.value)
    t2 = time.perf_counter()
    print(json.dumps({
        "points": len(r), "resamples": _RESAMPLES.value, "resamples_fitted": b["n_used"],
        "fit_s": round(t1 - t0, 3), "bootstrap_s": round(t2 - t1, 2),
        "fit": {k: round(float(v), 4) for k, v in vars(fit).items()},
        "critical_ratio": round(float(b["critical"]), 4),
        "critical_interval": [round(float(x), 4) for x in b["critical_interval"]],
    }, indent=2))


def main(argv: list[str] | None = None) -> int:
    """`python bench/replay.py` in this process: the exit code."""
    return CLI.run(bench, argv)


if __name__ == "__main__":
    sys.exit(main())
