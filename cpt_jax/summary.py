"""The comparison printed after a multi-run config: CPT vs from-scratch, and forgetting.

Everything comes from the runs' own `metrics.jsonl`; nothing is recomputed. Also draws the eval
curves of every run to `DIR/summary.png`, and, where runs logged the held-out loss by position
(`eval_position_bucket`), those curves at each run's first and last eval to `DIR/positions.png`.
"""

from __future__ import annotations

import io
import os

import numpy as np

from cpt_jax import positions as pos
from cpt_jax import storage
from cpt_jax.rundir import RunDir


def eval_curve(records: list[dict], lang: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss) at every eval of `lang` in a run's records."""
    key = f"eval/{lang}/loss"
    pts = [(r.get("train/tokens", 0.0), r[key]) for r in records if key in r]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def tokens_to_reach(tokens: np.ndarray, loss: np.ndarray, target: float, log: bool = False) -> float | None:
    """Tokens at which a loss curve first gets down to `target`: linear between evals, or with
    `log` linear in log tokens (for points spaced geometrically, as token budgets are)."""
    below = np.nonzero(loss <= target)[0]
    if not len(below):
        return None
    i = below[0]
    if i == 0:
        return float(tokens[0])
    t0, t1, l0, l1 = tokens[i - 1], tokens[i], loss[i - 1], loss[i]
    frac = (l0 - target) / (l0 - l1)
    return float(np.exp(np.log(t0) + frac * (np.log(t1) - np.log(t0))) if log else t0 + (t1 - t0) * frac)


def compare(workdir: str, report: dict, wall_s: float | None = None) -> str:
    """report = {"source": run, "cpt": run, "scratch": run, "target": "zh", "replay": "en"}."""
    runs = [report["source"], report["cpt"], report["scratch"]]
    recs = {r: RunDir.of(os.path.join(workdir, r)).read_metrics() for r in runs}
    tgt, src = report["target"], report["replay"]
    lines = [f"{'run':<10} {'tokens':>10} {f'{src} eval start':>14} {f'{src} eval end':>12} "
             f"{f'{tgt} eval start':>14} {f'{tgt} eval end':>12}"]
    for r in runs:
        _, s_loss = eval_curve(recs[r], src)
        tok, t_loss = eval_curve(recs[r], tgt)
        lines.append(f"{r:<10} {tok[-1]:>10,.0f} {s_loss[0]:>14.3f} {s_loss[-1]:>12.3f} "
                     f"{t_loss[0]:>14.3f} {t_loss[-1]:>12.3f}")

    cpt_tok, cpt_loss = eval_curve(recs[report["cpt"]], tgt)
    scr_tok, scr_loss = eval_curve(recs[report["scratch"]], tgt)
    lines.append("")
    lines.append(f"{tgt} eval loss at equal tokens (CPT vs scratch):")
    for t, c in zip(cpt_tok, cpt_loss):
        j = np.nonzero(scr_tok == t)[0]
        if len(j):
            lines.append(f"  {t:>10,.0f} tokens: CPT {c:.3f}  scratch {scr_loss[j[0]]:.3f}  "
                         f"(CPT {c - scr_loss[j[0]]:+.3f})")
    reach = tokens_to_reach(scr_tok, scr_loss, cpt_loss[-1])
    if reach is None:
        lines.append(f"  scratch never reaches CPT's final {tgt} loss {cpt_loss[-1]:.3f} "
                     f"within {scr_tok[-1]:,.0f} tokens")
    else:
        lines.append(f"  scratch needs {reach:,.0f} tokens to reach CPT's final {tgt} loss "
                     f"({cpt_tok[-1]:,.0f} for CPT)")
    _, before = eval_curve(recs[report["source"]], src)
    _, after = eval_curve(recs[report["cpt"]], src)
    lines.append(f"{src} eval loss (forgetting): source model {before[-1]:.3f} -> after CPT {after[-1]:.3f} "
                 f"({after[-1] - before[-1]:+.3f})")
    lines += _task_table(recs, runs)
    lines.append(f"curves: {_plot(workdir, recs, report)}")
    if wall_s is not None:
        lines.append(f"wall time: {wall_s / 60:.1f} min")
    return "\n".join(lines)


def _task_table(recs: dict[str, list[dict]], runs: list[str]) -> list[str]:
    """Downstream accuracy (the harness's acc) of each run's first and last model, for every task
    a run evaluated in the loop (config.eval_tasks); nothing if none did."""
    tasks = sorted({k.split("/")[1] for r in runs for rec in recs[r] for k in rec
                    if k.startswith("eval/") and k.endswith("/acc")})
    if not tasks:
        return []
    width = max(len(t) for t in tasks) + 2
    lines = ["", "downstream accuracy (start -> end of each run):",
             f"{'run':<10}" + "".join(f"{t:>{width + 8}}" for t in tasks)]
    for r in runs:
        cells = []
        for t in tasks:
            accs = [rec[f"eval/{t}/acc"] for rec in recs[r] if f"eval/{t}/acc" in rec]
            cells.append(f"{accs[0]:.3f} -> {accs[-1]:.3f}" if accs else "-")
        lines.append(f"{r:<10}" + "".join(f"{c:>{width + 8}}" for c in cells))
    return lines


def _plot(workdir: str, recs: dict[str, list[dict]], report: dict) -> str:
    """Eval curves of every run in both languages, plus the target language of CPT vs scratch
    from their first eval on, where the gap is too small to see on the full scale."""
    plt = _pyplot()
    src, tgt = report["replay"], report["target"]
    panels = [(f"{src} eval loss", src, list(recs), 0), (f"{tgt} eval loss", tgt, list(recs), 0),
              (f"{tgt}: CPT vs scratch", tgt, [report["cpt"], report["scratch"]], 1)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, lang, runs, skip) in zip(axes, panels):
        for run in runs:
            tok, loss = eval_curve(recs[run], lang)
            ax.plot(tok[skip:] / 1e6, loss[skip:], marker="o", markersize=3, label=run,
                    color=f"C{list(recs).index(run)}")
        ax.set(title=title, xlabel="tokens trained in the run (M)", ylabel="loss")
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, os.path.join(workdir, "summary.png"))


def positions(workdir: str, runs: list[str]) -> str:
    """Each run's held-out loss by position, at its first eval and its last, as a table and
    `workdir/positions.png`; "" where no run logged it."""
    dirs = {r: RunDir.of(os.path.join(workdir, r)) for r in runs}
    recs = {r: [rec for rec in d.read_metrics() if any(map(pos.is_key, rec))] for r, d in dirs.items()}
    recs = {r: rs for r, rs in recs.items() if rs}
    if not recs:
        return ""
    # a run that continues another starts from a trained model: its first eval is the "before"
    continued = {r for r in recs if (dirs[r].read_config() or {}).get("init_from")}
    lines = ["", "held-out loss by position (first eval -> last eval of each run):"]
    for run, rs in recs.items():
        for source in pos.sources(rs):
            starts, first = pos.curve(rs[0], source)
            _, last = pos.curve(rs[-1], source)
            lines.append(f"{run} ({source}, step {rs[0]['step']} -> {rs[-1]['step']}):")
            lines += [f"  positions {s:>6}+: {a:.3f} -> {b:.3f}" for s, a, b in zip(starts, first, last)]
    lines.append(f"by position: {_plot_positions(workdir, recs, continued)}")
    return "\n".join(lines)


def _plot_positions(workdir: str, recs: dict[str, list[dict]], continued: set[str]) -> str:
    """Each run's loss by position at its last eval, and at its first where it continues another
    run (a random model's first eval would only stretch the scale)."""
    plt = _pyplot()
    names = sorted({s for rs in recs.values() for s in pos.sources(rs)})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, source in zip(axes[0], names):
        for i, (run, rs) in enumerate(recs.items()):
            evals = [(rs[0], "--", "first eval")] if run in continued else []
            for rec, style, when in evals + [(rs[-1], "-", "last eval")]:
                starts, loss = pos.curve(rec, source)
                if len(starts):
                    ax.plot(starts, loss, style, marker="o", markersize=3, color=f"C{i}",
                            label=f"{run}, {when} (step {rec['step']})")
        ax.set(title=f"{source}: held-out loss by position", xlabel="position in the context (bucket start)",
               ylabel="loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, os.path.join(workdir, "positions.png"))


def _pyplot():
    import matplotlib  # seconds to import: only when a run's report draws
    matplotlib.use("Agg")  # headless: clusters and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    _pyplot().close(fig)
    storage.write_atomic(path, png.getvalue())  # local or gs://
    return path
