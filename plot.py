"""
Overlay the loss curves of several training runs (their out_dir/log.csv): loss against tokens seen and
against wall time, side by side, and print a table of each run's final numbers.
    python plot.py --runs=out-pico-tiny,out-pico-lstm,out-pico-kgram --out=compare.png
train.py draws each run's loss.png with plot_runs too.
"""
import csv
import os
import sys
import textwrap

# -----------------------------------------------------------------------------
runs: str | tuple | list = 'out'  # run folders (each with a log.csv), comma-separated
labels: str | tuple | list | None = None  # a label per run, comma-separated (None: the folder names)
out = 'compare.png'  # the figure to write
train = True  # draw the training loss too (thin lines), not only the validation loss
title = ''  # the figure's title
ylim: tuple | None = None  # the loss axis's range, e.g. (3.2, 4.5) (None: the range of the last 80% of training)
# -----------------------------------------------------------------------------


def read_log(run):
    """The rows of run/log.csv, as dicts of strings."""
    with open(os.path.join(run, 'log.csv')) as f:
        return list(csv.DictReader(f))


def plot_runs(logs, out, train=True, title='', ylim=None):
    """Draw the runs' loss curves (logs: a list of (label, rows of a log.csv)) against tokens seen and
    against wall time into the PNG file out, the loss axis zoomed onto the last 80% of training (where runs
    differ; the first steps fall from ~10 nats) unless ylim gives its range. Raises ImportError without
    matplotlib."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for (label, rows), color in zip(logs, plt.rcParams['axes.prop_cycle'].by_key()['color'] * 9):
        evals = [r for r in rows if r['val_loss']]
        steps = [r for r in rows if r['train_loss'] and not r['val_loss']]
        for ax, x in zip(axes, ('tokens', 'time_s')):
            if evals:
                ax.plot([float(r[x]) for r in evals], [float(r['val_loss']) for r in evals], 'o-', color=color, ms=3,
                        label=f"{label} val")
            if train and steps:
                ax.plot([float(r[x]) for r in steps], [float(r['train_loss']) for r in steps], '-', color=color,
                        lw=0.8, alpha=0.5, label=f"{label} train")
    if ylim is None:  # the losses of the last 80% of each run's tokens, with a margin
        late = [float(r[k]) for _, rows in logs for r in rows for k in ('train_loss', 'val_loss') if r[k] and
                int(r['tokens']) >= 0.2 * max(int(q['tokens']) for q in rows)]
        lo, hi = (min(late), max(late)) if late else (0, 1)
        ylim = (lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
    axes[0].set(xlabel='tokens seen', ylabel='loss (nats per token)', ylim=tuple(ylim))
    axes[1].set(xlabel='wall time (s)')
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle('\n'.join(textwrap.wrap(title, 140)))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

    def die(msg):
        sys.exit(f"plot.py: error: {msg}")

    def as_list(v):
        return [s.strip() for s in v.split(',') if s.strip()] if isinstance(v, str) else [str(s) for s in v]

    runs = as_list(runs)
    labels = as_list(labels) if labels is not None else [os.path.basename(os.path.normpath(r)) for r in runs]
    if not runs:
        die("runs is empty; give run folders, e.g. --runs=out-pico-tiny,out-pico-lstm")
    if len(labels) != len(runs):
        die(f"{len(labels)} labels for {len(runs)} runs")
    if ylim is not None and not (len(ylim) == 2 and ylim[0] < ylim[1]):
        die(f"ylim={ylim} must be (low, high) with low < high")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))) or os.path.isdir(out):
        die(f"out={out!r} cannot be written: {'it is a folder' if os.path.isdir(out) else 'its folder does not exist'}")
    logs = []
    for run, label in zip(runs, labels):
        path = os.path.join(run, 'log.csv')
        if not os.path.isfile(path):
            die(f"{path} not found (is {run!r} a train.py out_dir?)")
        logs.append((label, read_log(run)))
        if not logs[-1][1]:
            die(f"{path} has no rows yet")
    try:
        plot_runs(logs, out, train, title, ylim)
    except ImportError:
        die("plot.py needs matplotlib, which is not installed: pip install matplotlib")
    print(f"{'run':<20} {'iters':>6} {'tokens':>10} {'time_s':>8} {'train':>7} {'val':>7} {'best val':>8} {'tok/s':>8}")
    for label, rows in logs:
        evals = [r for r in rows if r['val_loss']]
        last = evals[-1] if evals else rows[-1]
        speeds = [float(r['tokens_per_s']) for r in rows if r['tokens_per_s']]
        print(f"{label:<20} {last['iter']:>6} {int(last['tokens']):>10,} {float(last['time_s']):8.1f} "
              f"{float(last['train_loss']):7.3f} {float(last['val_loss'] or 'nan'):7.3f} "
              f"{min((float(r['val_loss']) for r in evals), default=float('nan')):8.3f} "
              f"{sorted(speeds)[len(speeds) // 2] if speeds else float('nan'):8.0f}")
    print(f"wrote {out}", file=sys.stderr)
