"""`python -m sagsae report SWEEP_DIR [SWEEP_DIR …] --out FOLDER`: Markdown tables and PNG plots of sweeps.

Renders what sagsae/analysis/sweep_results.py reads. Per cell: R² against L0 and dead fraction against L0 for every series (seed means as lines, the seeds' range as
a band), a table of every sweep point, the Pareto verdict of each compared pair over their L0 overlap
with the sweep-geomean dead reduction, the bipolar census of signed SAEs, and what the paper reports for that
kind of hookpoint. Compared pairs come from `--compare A B` or the sweep config's `compare: [[A, B], …]`.
`--at_tokens N` reads every member as it stood after N training tokens (sweeps keep every budget checkpoint);
`--series A B …` reports only those series. `--tag 4× FOLDER …` names a group's series "SERIES 4×", so that one
report holds the same series at several widths.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import yaml

from sagsae.analysis.convergence import (L0_TOLERANCE, NOISE_MULTIPLE, R2_TOLERANCE, REFERENCE_POINTS, Plateau,
                                         at_target, converged_at, settling)
from sagsae.analysis.sweep_results import (at_budget, cell_verdicts, grid_point, has_metric, load_cells,
                                           only_series, own_band_readings, sweep_points, tagged)


def series_style(name: str, focus: list[str], index: int) -> dict:
    """The compared series in colour, every other one faded grey (report plots put the compared pair first); with
    nothing compared, every series in its own colour (`index`: its place among the plotted series)."""
    if not focus:
        return {"color": f"C{index % 10}"}
    if name in focus:
        return {"color": f"C{focus.index(name)}", "alpha": 0.95, "linewidth": 1.6, "zorder": 3}
    return {"color": "0.55", "alpha": 0.35, "linewidth": 0.9, "zorder": 1}


def plot_cell(label: str, series: dict[str, list[dict]], path: Path, pairs: list[tuple[str, str]] = ()) -> None:
    """R² against L0 and, beside it, the dead fraction, or ΔCE where every dead fraction is zero and ΔCE was
    measured; seed means as lines, the seeds' range as bands, the legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    focus = compared_series(pairs)
    all_rows = [r for rows in series.values() for r in rows]
    right_key = ("ce_delta" if all(r["dead_fraction"] == 0 for r in all_rows)
                 and any(has_metric(rows, "ce_delta") for rows in series.values()) else "dead_fraction")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    ordered = sorted(series, key=lambda name: (name not in focus, focus.index(name) if name in focus else 0))
    for index, name in enumerate(ordered):
        rows = series[name]
        style = series_style(name, focus, index)
        l0 = [r["l0"] for r in rows]
        for axis, key in ((left, "r2"), (right, right_key)):
            if not all(key in r for r in rows):
                continue
            axis.plot(l0, [r[key] for r in rows], marker="o", markersize=3, label=name, **style)
            axis.fill_between(l0, [r[f"{key}_min"] for r in rows], [r[f"{key}_max"] for r in rows], alpha=0.15,
                              color=style["color"])
    right_label = "ΔCE (nats, spliced − clean)" if right_key == "ce_delta" else "dead fraction (training window)"
    for axis, ylabel in ((left, "held-out R²"), (right, right_label)):
        axis.set_xscale("log")
        axis.set_xlabel("L0 (held-out)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    figure.legend(*left.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.suptitle(label)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def compared_series(pairs: list[tuple[str, str]]) -> list[str]:
    return list(dict.fromkeys(name for pair in pairs for name in pair))


R2_FLOOR = -0.5  # budget plots draw lower held-out R² at this floor, marked ▼
SYNTHETIC_SCORES = ("recovery", "bipolar_sharing", "absorption", "true_l0")  # columns where `synth` scored them


def plot_budgets(label: str, cell: dict, pairs: list[tuple[str, str]], path: Path) -> None:
    """Held-out R², L0 and (where measured) ΔCE against training tokens, one line per member: the compared
    series in colour and first in the legend (outside the axes), every other series faded grey (with nothing
    compared, each series its own colour), a series' grid points (λ or k, in member-name order) solid, dashed,
    dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    focus = compared_series(pairs)
    histories = {name: member.get("history") or [] for name, member in cell["members"].items()}
    keys = [("r2", "held-out R²"), ("l0", "L0 (held-out)")]
    if any("ce_delta" in row for history in histories.values() for row in history):
        keys.append(("ce_delta", "ΔCE (nats)"))
    figure, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.4))
    rank = {name: i for i, name in enumerate(focus)}  # the compared pair's own order, then the others
    members = sorted(cell["members"].items(), key=lambda item: (rank.get(item[1]["series"], len(rank)), item[0]))
    labelled: set[str] = set()
    order = list(dict.fromkeys(member["series"] for _, member in members))  # each series' colour, unless compared
    for name, member in members:
        history = histories[name]
        if len(history) < 2:
            continue
        series = member["series"]
        siblings = [other for other, m in members if m["series"] == series]  # a series' grid points: dashes
        dashes = ("-", "--", ":", "-.")[siblings.index(name) % 4]
        style = series_style(series, focus, order.index(series)) | {"linestyle": dashes}
        legend = series if series not in labelled else None
        labelled.add(series)
        for axis, (key, _) in zip(axes, keys):
            rows = [row for row in history if key in row]
            tokens = [row["tokens_seen"] / 1e6 for row in rows]
            values = [max(row[key], R2_FLOOR) if key == "r2" else row[key] for row in rows]
            axis.plot(tokens, values, marker=".", label=legend, **style)
            below = [t for t, row in zip(tokens, rows) if key == "r2" and row[key] < R2_FLOOR]
            if below:  # a breakdown stays visible without flattening every other curve
                axis.scatter(below, [R2_FLOOR] * len(below), marker="v", s=40, color=style["color"], zorder=4)
    if any(row["r2"] < R2_FLOOR for history in histories.values() for row in history):
        keys[0] = ("r2", f"held-out R² (▼: below {R2_FLOOR}, drawn at it)")
    for axis, (_, ylabel) in zip(axes, keys):
        axis.set_xlabel("training tokens (millions)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[1].set_yscale("log")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.suptitle(f"{label}: held-out metrics against the training budget")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def convergence_lines(cell: dict, pairs: list[tuple[str, str]]) -> list[str]:
    """Per member: the final budget's R² and L0, where it converged by the fixed rule and by the band of its
    own jitter (with the trend across the second half of the budget and the part of its R² trend that is not a
    slide along its series' curve), and how far its thresholds moved; the compared series first."""
    focus = compared_series(pairs)
    rank = {name: i for i, name in enumerate(focus)}
    members = sorted(((name, member) for name, member in cell["members"].items()
                      if len(member.get("history") or []) >= 2),
                     key=lambda item: (rank.get(item[1]["series"], len(rank)), item[0]))
    readings = own_band_readings(cell, members)
    lines = [f"Converged at (fixed) = the first budget from which held-out R² stays within {R2_TOLERANCE} and L0 "
             f"within {L0_TOLERANCE:.0%} of their final values; otherwise the change over the last budget step. "
             f"Converged at (own band) = the same with bands of {NOISE_MULTIPLE:g}× the member's own "
             "checkpoint-to-checkpoint jitter (never narrower than the fixed ones) around the mean of its last "
             f"{REFERENCE_POINTS} checkpoints, provided the fitted trend across the second half of the budget stays "
             "inside the band (else *drifting*) and the band is at most ten times the fixed one (else *too noisy*). "
             "R² gain at matched L0 = the second-half R² trend less what the L0 trend explains by sliding along the "
             "series' own final curve (ΔR² − slope · ln(1 + ΔL0/L0)): positive where the curve itself still rises; "
             "docs/method.md, \"When a run has converged\".", "",
             "| member | final tokens | R² | L0 | converged at (fixed) | last step: ΔR², ΔL0 | own band: R², L0 "
             "| second-half trend: R², L0 | converged at (own band) | R² gain at matched L0 | θ moved (median, relative) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines[2:2] = [*series_convergence_lines(members, readings), ""]
    for name, member in members:
        history = member["history"]
        final, before = history[-1], history[-2]
        at = converged_at(history)
        trend = f"{final['r2'] - before['r2']:+.4f}, {(final['l0'] - before['l0']) / max(before['l0'], 1e-9):+.1%}"
        reading, gain = readings[name]
        lines.append(f"| {name} | {final['tokens_seen']:,} | {_number(final['r2'])} | {_number(final['l0'], 2)} | "
                     f"{f'{at:,}' if at is not None else '**not converged**'} | {trend} | "
                     f"{_plateau_cells(reading)} | {_signed(gain)} | "
                     f"{_number(final.get('threshold_rel_change', math.nan))} |")
    return lines + [""]


def settling_lines(cell: dict) -> list[str]:
    """Per member, the settle criteria of docs/method.md ("When a run has converged"): at a fixed λ, no check-to-check jump past
    2M tokens larger than its seeds' spread, no ~1M-token span there over which L0 rose while R² fell, and the
    own-band rule converged within 8M tokens; at a target L0, every check of the last third within ±5% of the
    target and an R² trend there of at most 0.003 per 1M tokens. With the loss spikes each run counted."""
    seeds: dict[tuple, list[list[dict]]] = defaultdict(list)
    members = [(name, m) for name, m in sorted(cell["members"].items()) if len(m.get("history") or []) >= 2]
    for _, member in members:
        seeds[grid_point(member)].append(member["history"])
    lines = ["Settling (docs/method.md, \"When a run has converged\"): a jump is the largest check-to-check move past 2M tokens (R², L0 relative), "
             "against the range of the seeds' means there (never below 0.005 R², 5% L0); waste counts the ~1M-token "
             "spans past 2M over which L0 rose > 2% while R² fell > 0.002.", "",
             "| member | seeds | largest jump: R², L0 | seeds' spread: R², L0 | waste | own band | target L0 | "
             "loss spikes | settled |", "|---|---|---|---|---|---|---|---|---|"]
    for name, member in members:
        history, target = member["history"], member["point"].get("target_l0")
        runs = seeds[grid_point(member)]
        reading = settling(history, runs)
        on_target = None if target is None else at_target(history, target).settled
        settled = reading.settled if on_target is None else on_target
        own = "–" if reading.converged_at is None else f"{reading.converged_at:,.0f}"
        lines.append(f"| {name} | {len(runs)} | {reading.largest_jump[0]:.4f}, {reading.largest_jump[1]:.1%} | "
                     f"{reading.seed_spread[0]:.4f}, {reading.seed_spread[1]:.1%} | {reading.wasteful} | {own} | "
                     f"{'–' if on_target is None else ('yes' if on_target else '**no**')} | "
                     f"{_number(history[-1].get('loss_spikes', math.nan), 0)} | "
                     f"{'yes' if settled else '**no**'} |")
    return lines + [""]


def series_convergence_lines(members: list[tuple[str, dict]],
                             readings: dict[str, tuple[Plateau | None, float]]) -> list[str]:
    """Per series: how many members converged by each rule, over which budgets, how many drift or are too noisy
    to call by the own-band rule, and the range of their R² gains at matched L0."""
    by_series: dict[str, list[str]] = {}
    for name, member in members:
        by_series.setdefault(member["series"], []).append(name)
    histories = {name: member["history"] for name, member in members}
    lines = ["| series | members | converged (fixed) | at | converged (own band) | at | drifting | too noisy "
             "| R² gain at matched L0 (second half) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for series, names in by_series.items():
        fixed = [at for at in (converged_at(histories[name]) for name in names) if at is not None]
        own_readings = [readings[name][0] for name in names if readings[name][0] is not None]
        own = [reading.converged_at for reading in own_readings if reading.converged_at is not None]
        gains = [readings[name][1] for name in names if math.isfinite(readings[name][1])]
        gain_range = f"{_signed(min(gains))} … {_signed(max(gains))}" if gains else "–"
        lines.append(f"| {series} | {len(names)} | {len(fixed)} | {_budget_range(fixed)} | {len(own)} | "
                     f"{_budget_range(own)} | {sum(r.drifting and not r.too_noisy for r in own_readings)} | "
                     f"{sum(r.too_noisy for r in own_readings)} | {gain_range} |")
    return lines


def _budget_range(tokens: list[float]) -> str:
    if not tokens:
        return "–"
    low, high = (f"{t / 1e6:.1f}M" if t >= 1e5 else f"{t:,}" for t in (min(tokens), max(tokens)))
    return low if low == high else f"{low}–{high}"


def _plateau_cells(reading: Plateau | None) -> str:
    """The own-band columns of `convergence_lines`: band, second-half trend, verdict."""
    if reading is None:
        return "– | – | too short"
    if reading.too_noisy:
        verdict = "**too noisy**"
    elif reading.drifting:
        verdict = "**drifting**"
    else:
        verdict = f"{reading.converged_at:,}" if reading.converged_at is not None else "**not converged**"
    return (f"±{reading.r2_band:.3f}, ±{reading.l0_band:.0%} | {reading.r2_drift:+.3f}, {reading.l0_drift:+.0%} | "
            f"{verdict}")


def _percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.0%}"


def _signed(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:+.3f}"


def _number(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def cell_section(label: str, cell: dict, pairs: list[tuple[str, str]], image: str | None,
                 budget_image: str | None = None) -> tuple[list[str], list[dict]]:
    series = sweep_points(cell)
    lines = [f"## {label}", ""]
    activations = cell.get("activations") or {}
    if activations:
        described = ", ".join(f"{k} {activations[k]}" for k in ("model", "hookpoint", "layer")
                              if activations.get(k) is not None)
        if described:
            lines += [f"Activations: {described}.", ""]
    tokens = sorted({m.get("tokens_seen", 0) for m in cell["members"].values()})
    lines += [f"Steps per SAE: {', '.join(map(str, cell['steps']))}; training tokens per SAE: "
              f"{', '.join(f'{t:,}' for t in tokens)}.", ""]
    if image:
        lines += [f"![{label}]({image})", ""]
    extra = [key for key in SYNTHETIC_SCORES if any(key in r for rows in series.values() for r in rows)]
    header = ["series", "point", "seeds", "L0", "R² (min–max)", "dead", "silent (held-out)", "bipolar", *extra]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rows in series.items():
        for r in rows:
            point = ", ".join(f"{k} {v}" for k, v in r["point"].items())
            cells = [name, point, str(r["seeds"]), _number(r["l0"], 2),
                     f"{_number(r['r2'])} ({_number(r['r2_min'])}–{_number(r['r2_max'])})",
                     _number(r["dead_fraction"]), _number(r.get("silent_fraction", math.nan)),
                     _number(r.get("bipolar_fraction", math.nan), 2), *(_number(r.get(k, math.nan), 2) for k in extra)]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if budget_image:
        lines += ["### Convergence", "", f"![{label} against the budget]({budget_image})", "",
                  *convergence_lines(cell, pairs), *settling_lines(cell)]
    verdicts = cell_verdicts(label, cell, pairs)
    return lines + [""], verdicts


def verdict_table(verdicts: list[dict]) -> list[str]:
    lines = ["| cell | A | B | metric | L0 overlap | A vs B | A − B (min / max) | within seed noise | "
             "dead reduction B/A (geomean) | paper |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        span = f"{v['overlap'][0]:.1f}–{v['overlap'][1]:.1f}" if v["overlap"] else "none"
        below = " (every ΔCE < 0: both lower the LM's loss)" if v.get("below_zero") else ""
        lines.append(f"| {v['cell']} | {v['a']} | {v['b']} | {v.get('metric', 'R²')} | {span} | **{v['verdict']}**{below} | "
                     f"{_number(v['min_gap'])} / {_number(v['max_gap'])} | {_percent(v.get('within_noise'))} | "
                     f"{_number(v['dead_reduction'], 2)}× | {v['paper']} |")
    return lines


def write_report(sweeps: list[Path], out: Path, pairs: list[tuple[str, str]] | None = None,
                 at_tokens: int | None = None, series: list[str] | None = None,
                 tags: dict[Path, str] | None = None) -> Path:
    cells = load_cells(sweeps, tags)
    if series:
        cells = only_series(cells, series)
    if at_tokens is not None:
        cells = at_budget(cells, at_tokens)
    if pairs is None:
        pairs = []
        for sweep in sweeps:
            config = yaml.safe_load((sweep / "sweep.yaml").read_text()) if (sweep / "sweep.yaml").is_file() else {}
            tag = (tags or {}).get(sweep)
            for pair in (config or {}).get("compare", []):
                pair = tuple(tagged(name, tag) for name in pair)
                if pair not in pairs:
                    pairs.append(pair)
    out.mkdir(parents=True, exist_ok=True)
    sections, verdicts = [], []
    for label, cell in cells.items():
        image = f"{label}.png"
        plot_cell(label, sweep_points(cell), out / image, pairs)
        budget_image = None
        if any(len(member.get("history") or []) > 1 for member in cell["members"].values()):
            budget_image = f"{label}_budget.png"
            plot_budgets(label, cell, pairs, out / budget_image)
        lines, cell_verdicts = cell_section(label, cell, pairs, image, budget_image)
        sections += lines
        verdicts += cell_verdicts
    lines = ["# Sweep report", "", "Sweeps: " + ", ".join(f"`{s}`" + (f" ({tags[s]})" if s in (tags or {}) else "")
                                                    for s in sweeps), ""]
    if at_tokens is not None:
        lines += [f"Every member as it stood after {at_tokens:,} training tokens (its last budget checkpoint "
                  f"within them; `--at_tokens`).", ""]
    if verdicts:
        lines += ["## Pareto verdicts", "",
                  "A dominates B when its interpolated R²(L0) is ≥ B's (or its ΔCE(L0), the spliced LM loss minus "
                  "the clean one, ≤ B's) everywhere on the L0 range both sweeps cover, counting only gaps wider "
                  "than the seeds' spread there (the tie band: \"within noise\" when no gap is). A − B is R²_A − R²_B "
                  "or ΔCE_A − ΔCE_B (nats; negative favours A). Dead reduction: geometric mean over the matched L0 "
                  "points of dead_B / dead_A.", "",
                  *verdict_table(verdicts), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines + sections))
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sagsae report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="*", type=Path,
                        help="sweep output folders (from `sweep` or `synth`); same-named cells are merged")
    parser.add_argument("--tag", nargs="+", action="append", metavar=("TAG", "FOLDER"),
                        help="a tag and its sweep folders (repeatable): their series are named 'SERIES TAG', e.g. "
                             "--tag 1× A --tag 4× B puts 'SA-GSAE(H) 1×' beside 'SA-GSAE(H) 4×'")
    parser.add_argument("--out", type=Path, help="report folder (default: <first sweep>/report)")
    parser.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"),
                        help="series to compare (repeatable); default: the sweep config's `compare`")
    parser.add_argument("--series", nargs="+", help="report only these series (their `name`s in the sweep configs)")
    parser.add_argument("--at_tokens", type=int, metavar="N",
                        help="read every member at its last budget checkpoint within N training tokens (from its "
                             "history), to see whether a verdict holds as the budget grows")
    args = parser.parse_args(argv)
    if args.at_tokens is not None and args.at_tokens <= 0:
        parser.error("--at_tokens must be positive")
    tags = {}
    for tag, *folders in args.tag or []:
        if not folders:
            parser.error(f"--tag {tag} names no sweep folder: --tag TAG FOLDER [FOLDER …]")
        tags.update((Path(folder), tag) for folder in folders)
    sweeps = [*args.sweeps, *tags]
    if not sweeps:
        parser.error("name at least one sweep folder (or --tag TAG FOLDER …)")
    report = write_report(sweeps, args.out or sweeps[0] / "report",
                          [tuple(pair) for pair in args.compare] if args.compare else None, args.at_tokens, args.series,
                          tags)
    print(f"Wrote {report}")
