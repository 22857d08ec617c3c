"""Compare block-sparse layouts of about the same density and draw them.

Builds a banded, a random, a Watts-Strogatz (small world) and a Barabasi-Albert
(scale-free) layout of ``--n`` blocks at about ``--density``, prints a table of
``blocksparse_tf.layouts.describe`` numbers, and writes into ``--out``:

* ``<name>.png``  one spy plot per layout, statistics in the title;
* ``mixing.png``  fraction of units reachable within t steps, all layouts together;
* ``overview.png`` the spy plots and the mixing curves in one picture.

Run ``python examples/plot_layouts.py --help`` for the options.  Takes a few seconds.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from blocksparse_tf import layouts  # noqa: E402
from examples.cli import fraction, number, seed  # noqa: E402


def build(n, density, p, seed):
    """The four layouts to compare, each as close to ``density`` as its generator allows."""
    band, _ = layouts.params_for_density("banded", n, density)
    ws, _ = layouts.params_for_density("watts_strogatz", n, density)
    ba, _ = layouts.params_for_density("barabasi_albert", n, density)
    return {
        f"banded (b={band['bandwidth']})": layouts.banded(**band),
        "random": layouts.random(n, n, density, seed=seed),
        f"watts_strogatz (k={ws['k']}, p={p:g})": layouts.watts_strogatz(**ws, p=p, seed=seed),
        f"barabasi_albert (m={ba['m']})": layouts.barabasi_albert(**ba, seed=seed),
    }


def table(stats):
    """Text table of describe() results, one row per layout."""
    head = f"{'layout':<28} {'density':>8} {'blocks/col':>12} {'path':>6} {'clust':>6} {'t90':>4}"
    lines = [head, "-" * len(head)]
    for name, d in stats.items():
        lo, mean, hi = d["col_blocks"]
        t90 = "-" if d["t90"] is None else str(d["t90"])
        lines.append(
            f"{name:<28} {d['density']:>8.3f} {f'{lo}/{mean:.1f}/{hi}':>12} "
            f"{d['avg_shortest_path']:>6.2f} {d['clustering']:>6.2f} {t90:>4}"
        )
    return "\n".join(lines)


def _file_name(label):
    return label.split(" ")[0] + ".png"


def _check_out(parser, out):
    """Creates the output folder now, so that a path that cannot be one fails before the
    layouts are computed."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {out!r}: cannot create the folder ({e.strerror or e})")
    if not os.access(out, os.W_OK | os.X_OK):
        parser.error(f"--out {out!r}: the folder is not writable")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Watts-Strogatz, the most demanding generator, needs n >= 3.
    parser.add_argument("--n", type=number(int, lambda v: v >= 3, ">= 3"), default=64,
                        help="blocks per side, at least 3 (default 64)")
    parser.add_argument("--density", type=fraction,
                        default=0.1, help="target density (0.1)")
    parser.add_argument("--p", type=number(float, lambda v: 0 <= v <= 1, "in [0, 1]"),
                        default=0.1, help="Watts-Strogatz rewiring (0.1)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="random seed (0)")
    parser.add_argument("--out", default="layout_plots", help="output folder (./layout_plots)")
    args = parser.parse_args(argv)
    _check_out(parser, args.out)
    return args


def main(argv=None):
    args = parse_args(argv)

    built = build(args.n, args.density, args.p, args.seed)
    stats = {name: layouts.describe(layout) for name, layout in built.items()}
    print(table(stats))

    os.makedirs(args.out, exist_ok=True)
    written = []
    for name, layout in built.items():
        path = os.path.join(args.out, _file_name(name))
        layouts.plot(layout, path, title=name, stats=stats[name])
        written.append(path)
    path = os.path.join(args.out, "mixing.png")
    layouts.plot_mixing(stats, path)
    written.append(path)

    from matplotlib.figure import Figure  # no pyplot: nothing to close, no GUI backend

    fig = Figure(figsize=(4.0 * (len(built) + 1.5), 4.6), layout="constrained")
    grid = fig.add_gridspec(1, len(built) + 2)
    for i, (name, layout) in enumerate(built.items()):
        layouts.plot(layout, title=name, stats=stats[name], ax=fig.add_subplot(grid[0, i]))
    layouts.plot_mixing(stats, ax=fig.add_subplot(grid[0, len(built):]))
    path = os.path.join(args.out, "overview.png")
    fig.savefig(path, dpi=72)
    written.append(path)
    print("wrote " + ", ".join(written))
    return written


if __name__ == "__main__":
    main()
