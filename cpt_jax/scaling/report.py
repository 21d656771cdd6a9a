"""`python -m cpt_jax.sweep report --sweep_dir DIR`: the sweep's runs -> fits -> report.md,
report.json and PNG plots, the analysis of the paper from one's own runs.

Points are (N, D, L): N the run's parameters, D the tokens trained at each eval after the first
(every eval is a point, as intermediate checkpoints are in the paper), L the target-language eval
loss. Scratch points fit Chinchilla; CPT points (the first replay ratio) fit the CPT law with E,
A, alpha frozen at the scratch fit, as the paper does.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cpt_jax.rundir import RunDir  # noqa: E402
from cpt_jax.scaling import fit as fitting  # noqa: E402
from cpt_jax.scaling import laws  # noqa: E402
from cpt_jax.summary import eval_curve  # noqa: E402

SECTIONS = ("Runs", "Loss vs tokens", "Fitted laws", "Fit errors", "Compute-optimal allocation", "FLOPs saved by CPT",
            "Forgetting")


def collect(sweep_dir: str) -> tuple[dict, dict[str, dict]]:
    """The plan (sweep.json) and, per run, its eval curves of both languages."""
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        plan = json.load(f)
    curves = {}
    for run in plan["runs"]:
        recs = RunDir.of(os.path.join(sweep_dir, run["name"])).read_metrics()
        curves[run["name"]] = {lang: eval_curve(recs, lang) for lang in (plan["source"], plan["target"])}
    return plan, curves


def points(plan: dict, curves: dict, kind: str, lang: str, ratio: float | None = None) -> np.ndarray:
    """[k, 3] (N, D, L) of every eval after the start of every run of `kind`."""
    out = []
    for run in plan["runs"]:
        if run["kind"] != kind or (ratio is not None and run["replay_ratio"] != ratio):
            continue
        tokens, loss = curves[run["name"]][lang]
        out += [(run["params"], d, l) for d, l in zip(tokens, loss) if d > 0]
    return np.array(out).reshape(-1, 3)


def _fmt(fit, ci: dict) -> list[str]:
    rows = []
    for k in ("E", "A", "B", "B_prime", "alpha", "beta", "beta_prime", "gamma"):
        if hasattr(fit, k) and not (k == "gamma" and isinstance(fit, laws.ChinchillaFit)):
            lo, hi = ci.get(k, (np.nan, np.nan))
            rows.append(f"| {k} | {getattr(fit, k):.4g} | [{lo:.4g}, {hi:.4g}] |")
    return rows


def _paper_constants() -> str:
    s, c = laws.PAPER_SCRATCH, laws.PAPER_CPT
    return (f"Paper: scratch E={s.E:g}, A={s.A:g}, B={s.B:g}, alpha={s.alpha:.2f}, beta={s.beta:.2f}; "
            f"CPT B'={c.B_prime:g}, beta'={c.beta_prime:.2f}, gamma={c.gamma:.2f}.")


def _allocation(fit) -> tuple[str, str, float, float]:
    """N_opt and D_opt as formulas in C (C = 6 N D), and their exponents a, b."""
    G, a, b = laws.allocation(fit)
    return f"{G / 6 ** a:.4g} C^{a:.3f}", f"{1 / (G * 6 ** b):.4g} C^{b:.3f}", a, b


def write_report(sweep_dir: str, bootstrap: int = 100) -> str:
    """Writes DIR/report.md, report.json and the plots; returns the path of report.md."""
    plan, curves = collect(sweep_dir)
    tgt, src = plan["target"], plan["source"]
    ratios = sorted({r["replay_ratio"] for r in plan["runs"] if r["kind"] == "cpt"})
    scratch_pts = points(plan, curves, "scratch", tgt)
    cpt_pts = points(plan, curves, "cpt", tgt, ratios[0] if ratios else None)
    md = [f"# Sweep report: {sweep_dir}", "", f"Target `{tgt}`, source `{src}`; {len(plan['runs'])} runs.", ""]
    out: dict = {"sweep_dir": sweep_dir, "target": tgt, "source": src}

    # --- Runs.
    md += ["## Runs", "", "| run | N | tokens planned | tokens done | final target loss |", "|---|---|---|---|---|"]
    for run in plan["runs"]:
        lang = src if run["kind"] == "source" else tgt
        tokens, loss = curves[run["name"]][lang]
        done = f"{tokens[-1]:,.0f}" if len(tokens) else "-"
        final = f"{loss[-1]:.4f}" if len(loss) else "-"
        md.append(f"| {run['name']} | {run['params']:,} | {run['tokens']:,} | {done} | {final} |")
    md.append("")

    # --- Loss vs tokens per size.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, size in enumerate(dict.fromkeys(r["size"] for r in plan["runs"])):
        for run in (r for r in plan["runs"] if r["size"] == size and r["kind"] != "source"):
            tokens, loss = curves[run["name"]][tgt]
            ax.plot(tokens[tokens > 0], loss[tokens > 0], "-" if run["kind"] == "scratch" else "--", color=f"C{i}",
                    label=f"{size} {run['kind']}" + (f" r={run['replay_ratio']:g}" if run["kind"] == "cpt" else ""))
    ax.set(xscale="log", xlabel="tokens", ylabel=f"{tgt} eval loss",
           title="loss vs tokens (solid: scratch, dashed: CPT)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "loss_vs_tokens.png"), dpi=120)
    plt.close(fig)
    md += ["## Loss vs tokens", "", "![](loss_vs_tokens.png)", ""]

    # --- Fits with bootstrap intervals.
    md += ["## Fitted laws", ""]
    scratch = cpt = None
    if len(scratch_pts) >= 5 and len(cpt_pts) >= 5:
        scratch = fitting.fit_chinchilla(*scratch_pts.T)
        cpt = fitting.fit_cpt(*cpt_pts.T, base=scratch)
        ci_s = fitting.intervals(scratch, *scratch_pts.T, n=bootstrap)
        ci_c = fitting.intervals(cpt, *cpt_pts.T, n=bootstrap)
        out["scratch_fit"], out["cpt_fit"] = vars(scratch), vars(cpt)
        out["scratch_intervals"], out["cpt_intervals"] = ci_s, ci_c
        md += [f"Scratch (Chinchilla, {len(scratch_pts)} points): L = E + A/N^alpha + B/D^beta", "",
               "| constant | value | 95% bootstrap interval |", "|---|---|---|", *_fmt(scratch, ci_s), "",
               f"CPT ({len(cpt_pts)} points, E, A, alpha from scratch): L = E + A/N^alpha + B'/(D^beta' N^gamma)", "",
               "| constant | value | 95% bootstrap interval |", "|---|---|---|", *_fmt(cpt, ci_c), "",
               _paper_constants(), "", "![](fit.png)", ""]
        fig, ax = plt.subplots(figsize=(5, 5))
        for pts, f, name in ((scratch_pts, scratch, "scratch"), (cpt_pts, cpt, "CPT")):
            ax.scatter(pts[:, 2], laws.predict(f, pts[:, 0], pts[:, 1]), s=10, label=name)
        lo, hi = min(scratch_pts[:, 2].min(), cpt_pts[:, 2].min()), max(scratch_pts[:, 2].max(), cpt_pts[:, 2].max())
        ax.plot([lo, hi], [lo, hi], "k:", lw=1)
        ax.set(xlabel="observed loss", ylabel="fitted law", title="fits against the points")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(sweep_dir, "fit.png"), dpi=120)
        plt.close(fig)
    else:
        md += [f"Not enough points to fit (scratch {len(scratch_pts)}, CPT {len(cpt_pts)}; 5 each needed).", ""]

    # --- Fit errors: both laws on both data sets (the CPT law with E, A, alpha from the scratch fit).
    md += ["## Fit errors", ""]
    if scratch is not None:
        errors = {}
        pairs = {"scratch": (scratch, fitting.fit_cpt(*scratch_pts.T, base=scratch)),  # each law fitted to each set
                 "cpt": (fitting.fit_chinchilla(*cpt_pts.T), cpt)}
        for name, (chinchilla, cpt_law) in pairs.items():
            errors[name] = {"chinchilla": chinchilla.huber, "cpt_law": cpt_law.huber, "cpt_law_gamma": cpt_law.gamma}
        out["fit_errors"] = errors
        md += ["Sum of Huber losses (delta 1e-3) on log L at the best fit of each law to each data set.", "",
               "| data | Chinchilla law | CPT law | CPT law's gamma |", "|---|---|---|---|"]
        md += [f"| {k} | {v['chinchilla']:.3g} | {v['cpt_law']:.3g} | {v['cpt_law_gamma']:+.3f} |"
               for k, v in errors.items()]
        md.append("")
    else:
        md += ["n/a (no fits)", ""]

    # --- Compute-optimal allocation and savings.
    md += ["## Compute-optimal allocation", ""]
    alloc_ok = False
    if scratch is not None:
        try:
            rows = []
            for name, f in (("scratch", scratch), ("CPT", cpt)):
                n_opt, d_opt, a, b = _allocation(f)
                rows.append(f"| {name} | {a:.3f} | {b:.3f} | {n_opt} | {d_opt} |")
            alloc_ok = True
            paper = "; ".join(f"{name} N_opt = {n}, D_opt = {d}" for name, f in
                              (("scratch", laws.PAPER_SCRATCH), ("CPT", laws.PAPER_CPT)) for n, d, _, _ in [_allocation(f)])
            md += ["| law | a | b | N_opt | D_opt |", "|---|---|---|---|---|", *rows, "",
                   f"Paper (from its constants): {paper}.", "", "![](compute_optimal.png)", ""]
            C = np.geomspace(1e15, 1e24, 50)
            fig, axes = plt.subplots(1, 2, figsize=(9, 4))
            for f, name in ((scratch, "scratch"), (cpt, "CPT")):
                n, d = laws.compute_optimal(f, C)
                axes[0].plot(C, n, label=name)
                axes[1].plot(C, d, label=name)
            for ax, what in zip(axes, ("N_opt (parameters)", "D_opt (tokens)")):
                ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=what)
                ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(sweep_dir, "compute_optimal.png"), dpi=120)
            plt.close(fig)
        except ValueError as e:
            md += [f"n/a: {e}", ""]
    else:
        md += ["n/a (no fits)", ""]

    md += ["## FLOPs saved by CPT", ""]
    if alloc_ok:
        lo, hi = np.percentile(cpt_pts[:, 2], [10, 90])
        s = laws.savings(scratch, cpt, np.linspace(lo, hi, 5))
        out["savings"] = {k: v.tolist() for k, v in s.items()}
        md += ["On each law's compute-optimal frontier; the paper reports 25%-50% fewer FLOPs.", "",
               "| target loss | FLOPs scratch | FLOPs CPT | tokens scratch | tokens CPT | FLOPs saved |",
               "|---|---|---|---|---|---|"]
        md += [f"| {l:.3f} | {a:.3g} | {b:.3g} | {ta:.3g} | {tb:.3g} | {x:+.1%} |" for l, a, b, ta, tb, x in
               zip(s["loss"], s["flops_scratch"], s["flops_cpt"], s["tokens_scratch"], s["tokens_cpt"], s["saved"])]
        md.append("")
    else:
        md += ["n/a (no compute-optimal allocation)", ""]

    # --- Forgetting: the source language's eval loss through CPT, per run.
    md += ["## Forgetting", "", f"`{src}` eval loss of each CPT run: at its start (the source model) and end.", "",
           "| run | replay | start | end | change |", "|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4))
    forgetting = {}
    for run in (r for r in plan["runs"] if r["kind"] == "cpt"):
        tokens, loss = curves[run["name"]][src]
        if len(loss):
            forgetting[run["name"]] = {"start": float(loss[0]), "end": float(loss[-1])}
            md.append(f"| {run['name']} | {run['replay_ratio']:g} | {loss[0]:.4f} | {loss[-1]:.4f} | "
                      f"{loss[-1] - loss[0]:+.4f} |")
            ax.plot(tokens, loss, label=run["name"])
    out["forgetting"] = forgetting
    ax.set(xlabel="CPT tokens", ylabel=f"{src} eval loss", title="source-language loss during CPT")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "forgetting.png"), dpi=120)
    plt.close(fig)
    md += ["", "![](forgetting.png)", ""]

    path = os.path.join(sweep_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(sweep_dir, "report.json"), "w") as f:
        json.dump(out, f, indent=2, default=float)
    return path
