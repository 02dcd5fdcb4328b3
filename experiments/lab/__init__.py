"""What the experiment scripts share, in the order a script uses it:

    cli.py     the scales, the paper's models by name, the arguments, the Context of one invocation, `main`
    runs.py    the data (tokenised once), training runs (shared, resumable), validation loss, tables, scoring
    paper.py   the paper's result tables and zero-shot tasks (lm-eval), the --plan estimate
    report.py  result -> markdown + JSON + PNG, and the plot helpers

A script is `python experiments/<name>.py --scale tiny|small|paper [--out DIR] [--data PATH ...]`; Python puts
experiments/ on the path, so it imports `from lab import cli, paper, report, runs`. Its `experiment(ctx)` measures,
turns the measurements into rows, and returns `report.result(...)` with a plot function.

mole_jax modules that import jax (and matplotlib, lm-eval) are imported inside the functions that use them, so
that `--help` and argument errors answer at once; mole_jax.config and mole_jax.data are imported at the top.
"""
