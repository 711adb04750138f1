"""Reading sweep results: finished cells merged across folders, members cut at a budget, seeds grouped into sweep
points, each series' curve, the paper's claim for a pair, each member's own-band reading, and the Pareto verdicts.
`sagsae report` renders them (sagsae/commands/report.py)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean

from sagsae.analysis.convergence import Plateau, gain_at_matched_l0, plateau
from sagsae.analysis.pareto import Curve, compare

RESULTS = "results.json"
PAPER = {  # the paper's (docs/results.md): half-width SA-GSAE vs full-width Gated, by hookpoint kind
    "mlp_out": "dominates on both models; dead reduction ≈100–500×",
    "attn_out": "matches (R² within 0.025); dead reduction ≈2–4×",
    "resid_mid": "dominates on Pythia-1B (≈100–500×); matches on SmolLM3-3B (≈2–4×)",
}


def tagged(name: str, tag: str | None) -> str:
    """A series' name within a tagged group of sweeps ("SA-GSAE(H)" of the group "4×": "SA-GSAE(H) 4×")."""
    return f"{name} {tag}" if tag else name


def load_cells(sweeps: list[Path], tags: dict[Path, str] | None = None) -> dict[str, dict]:
    """cell name → results.json of every finished cell of the given sweep folders. Cells of the same name in
    several sweeps (the same data) are merged, so that series from separate sweeps can be compared; their
    step counts are listed, since a comparison is only fair at one budget. A member found in two folders is
    refused: it would count twice as a seed. A folder with a tag (e.g. its width, "4×") has the tag added to its
    series' and members' names, so that the same series at two widths stay apart."""
    cells: dict[str, dict] = {}
    origin: dict[tuple[str, str], Path] = {}
    for sweep in sweeps:
        files = sorted(sweep.glob(f"*/{RESULTS}"))
        if not files:
            raise FileNotFoundError(f"{sweep} holds no finished cell (no */{RESULTS}); run the sweep first")
        tag = (tags or {}).get(sweep)
        for path in files:
            cell = json.loads(path.read_text())
            if tag:
                cell["members"] = {tagged(member, tag): {**values, "series": tagged(values["series"], tag)}
                                   for member, values in cell["members"].items()}
            name = path.parent.name
            for member in cell["members"]:
                if (name, member) in origin:
                    raise ValueError(f"{member} of cell {name} is in both {origin[name, member]} and {sweep}: the same "
                                     f"SAE would count twice as a seed; give `report` only one of them")
                origin[name, member] = sweep
            if name not in cells:
                cells[name] = {**cell, "steps": [cell["steps"]]}
                continue
            merged = cells[name]
            merged["members"].update(cell["members"])
            merged["steps"] = sorted(set(merged["steps"]) | {cell["steps"]})
    return cells


def at_budget(cells: dict[str, dict], tokens: int) -> dict[str, dict]:
    """The cells as they stood after `tokens` training tokens: each member's last budget checkpoint within it
    (its metrics, and its history cut there), so that a verdict can be read at several budgets."""
    cut = {}
    for label, cell in cells.items():
        members = {}
        for name, member in cell["members"].items():
            rows = [row for row in member.get("history") or [] if row["tokens_seen"] <= tokens]
            if not rows:
                raise ValueError(f"{name} of cell {label} has no budget checkpoint at or below {tokens:,} tokens "
                                 f"(--at_tokens): choose a budget its history reaches")
            kept = {key: member[key] for key in ("series", "architecture", "point", "width") if key in member}
            members[name] = {**kept, "history": rows, **rows[-1]}
        cut[label] = {**cell, "members": members, "steps": [f"cut at {tokens:,} tokens"]}
    return cut


def sweep_points(cell: dict) -> dict[str, list[dict]]:
    """series → its sweep points, each the seed mean (and range) of the members sharing a grid point."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for member in cell["members"].values():
        groups[grid_point(member)].append(member)
    series: dict[str, list[dict]] = defaultdict(list)
    for (name, point), members in groups.items():
        row = {"point": dict(point), "seeds": len(members), "width": members[0]["width"]}
        for key in members[0]:
            values = [m[key] for m in members if isinstance(m.get(key), (int, float)) and not isinstance(m[key], bool)]
            if len(values) == len(members) and key != "width":
                finite = [v for v in values if math.isfinite(v)]
                row[key] = mean(finite) if finite else math.nan
                row[f"{key}_min"], row[f"{key}_max"] = (min(finite), max(finite)) if finite else (math.nan, math.nan)
        series[name].append(row)
    return {name: sorted(rows, key=lambda r: r["l0"]) for name, rows in series.items()}


METRICS = {"r2": ("R²", 1), "ce_delta": ("ΔCE", -1)}  # key → (label, sign that makes higher better)


def curve(rows: list[dict], metric: str = "r2") -> Curve:
    """A series' curve of `metric` against L0 (ΔCE negated, so that higher is better for every metric)."""
    sign = METRICS[metric][1]
    return Curve.from_points([(r["l0"], sign * r[metric], r["dead_fraction"], r[f"{metric}_max"] - r[f"{metric}_min"])
                              for r in rows if r["l0"] > 0], rows[0]["width"])


def has_metric(rows: list[dict], metric: str) -> bool:
    return all(isinstance(r.get(metric), float) and math.isfinite(r[metric]) for r in rows)


def hookpoint_of(cell: dict) -> str | None:
    return (cell.get("activations") or {}).get("hookpoint")


def member_architecture(member: dict) -> str | None:
    """A member's registry name; results.json written before sweeps recorded it name the training class."""
    legacy = {"SAGSAE": "sagsae", "GatedSAE": "gated"}
    return member.get("architecture") or legacy.get(member.get("class_path", "").rpartition(".")[2])


def paper_claim(cell: dict, a: str, b: str) -> str:
    """What the paper reports for this kind of hookpoint, where the pair is the paper's own (an SA-GSAE series
    against a Gated one); "–" for any other pair."""
    kinds = {m["series"]: member_architecture(m) for m in cell["members"].values()}
    if (kinds.get(a), kinds.get(b)) != ("sagsae", "gated"):
        return "–"
    return PAPER.get(hookpoint_of(cell) or "", "–")


def grid_point(member: dict) -> tuple:
    """A member's series and grid point, less its seed: the members that are seeds of one configuration."""
    return member["series"], tuple(sorted((k, v) for k, v in member["point"].items() if k != "init_seed"))


def own_band_readings(cell: dict, members: list[tuple[str, dict]]) -> dict[str, tuple[Plateau | None, float]]:
    """member → (its own-band reading, its second-half R² gain at matched L0; NaN where either is missing)."""
    curves = {series: curve(rows) for series, rows in sweep_points(cell).items() if has_metric(rows, "r2")}
    readings = {}
    for name, member in members:
        reading = plateau(member["history"])
        series_curve = curves.get(member["series"])
        gain = (gain_at_matched_l0(reading, series_curve.slope_at(member["history"][-1]["l0"]))
                if reading is not None and series_curve is not None else math.nan)
        readings[name] = (reading, gain)
    return readings


def only_series(cells: dict[str, dict], series: list[str]) -> dict[str, dict]:
    """The cells with only the members of the named series (cells left with none are dropped)."""
    known = {member["series"] for cell in cells.values() for member in cell["members"].values()}
    unknown = sorted(set(series) - known)
    if unknown:
        raise ValueError(f"Unknown series {unknown} (--series); these sweeps hold: {sorted(known)}")
    kept = {label: {**cell, "members": {name: member for name, member in cell["members"].items()
                                        if member["series"] in series}} for label, cell in cells.items()}
    return {label: cell for label, cell in kept.items() if cell["members"]}


def cell_verdicts(label: str, cell: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    """The Pareto verdict of each compared pair present in the cell, for R² and, where measured, ΔCE (gaps given
    as A − B in the metric's own sign: ΔCE gaps are in nats, negative favouring A). `below_zero` marks a ΔCE
    verdict where every seed of both series lowers the LM's loss (ΔCE < 0): there a lower ΔCE is no better fit."""
    series = sweep_points(cell)
    verdicts = []
    for a, b in pairs:
        if a not in series or b not in series:
            continue
        for metric, (name, sign) in METRICS.items():
            if not (has_metric(series[a], metric) and has_metric(series[b], metric)):
                continue
            v = compare(curve(series[a], metric), curve(series[b], metric))
            verdicts.append({"cell": label, "a": a, "b": b, "metric": name, "verdict": v.verdict, "overlap": v.overlap,
                             "min_gap": sign * (v.min_gap if sign > 0 else v.max_gap),
                             "max_gap": sign * (v.max_gap if sign > 0 else v.min_gap),
                             "dead_reduction": v.dead_reduction, "within_noise": v.within_noise,
                             "paper": paper_claim(cell, a, b),
                             "below_zero": metric == "ce_delta" and all(r[f"{metric}_max"] < 0
                                                                        for r in series[a] + series[b])})
    return verdicts
