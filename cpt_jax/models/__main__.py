"""`python -m cpt_jax.models`: the size registry as a table (parameter counts at the paper's vocab)."""

from cpt_jax.models.sizes import table

print(f"{'size':>6} {'paper M':>8} {'total M':>8} {'non-emb M':>9} {'hidden':>6} {'inter':>6} {'heads':>5} "
      f"{'layers':>6}")
for r in table():
    paper = "-" if r["paper_m"] is None else str(r["paper_m"])
    print(f"{r['size']:>6} {paper:>8} {r['params'] / 1e6:8.1f} {r['non_embedding'] / 1e6:9.1f} {r['hidden']:>6} "
          f"{r['intermediate']:>6} {r['heads']:>5} {r['layers']:>6}  {r['note']}")
