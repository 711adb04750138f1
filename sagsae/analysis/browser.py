"""A static feature browser: the figures of `sagsae.analysis.inspection` written as a folder that opens offline.

    out/index.html          the app (sagsae/analysis/browser_app.html): an index of latents and one view per latent
    out/data/index.js       one row per latent (the index sorts, filters and pages these)
    out/data/latents_N.js   the full records of latents N … N + chunk − 1, loaded only when one is opened
    out/data/*.json         the same data as JSON, for other tools

Data go in `.js` files that call a global function, because a page opened from disk (file://) may load scripts
but not fetch JSON. The folder appears whole or not at all (staged_folder).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from sagsae.analysis.inspection import SIDES, LatentStatistics, histogram_edges
from sagsae.formats.staging import staged_folder

APP = Path(__file__).with_name("browser_app.html")
CHUNK = 128  # latents per data file


def latent_records(stats: LatentStatistics, token_text: Callable[[int], str],
                   logits: tuple[Tensor, Tensor, Tensor, Tensor] | None) -> list[dict[str, Any]]:
    """Every latent's record: its summary, each side's examples (token strings, codes, the firing token's place)
    and, given `logit_effects`' output, its promoted and suppressed tokens."""
    records = []
    for latent in range(stats.width):
        record = asdict(stats.summary(latent))
        for side in SIDES:
            record[side] = [{"score": round(score, 4), "at": at, "tokens": [token_text(t) for t in tokens],
                             "codes": [round(code, 4) for code in codes]}
                            for score, tokens, codes, at in stats.top[side].examples(latent, stats.before)]
        if logits is not None:
            promoted, promoted_values, suppressed, suppressed_values = (t[latent].tolist() for t in logits)
            record["promoted"] = [[token_text(t), round(v, 3)] for t, v in zip(promoted, promoted_values)]
            record["suppressed"] = [[token_text(t), round(v, 3)] for t, v in zip(suppressed, suppressed_values)]
        records.append(record)
    return records


def index_row(record: dict[str, Any]) -> dict[str, Any]:
    """What the index shows and searches: the figures and the firing tokens of the top examples on each side."""
    def firing_tokens(side: str) -> list[str]:
        return list(dict.fromkeys(example["tokens"][example["at"]] for example in record[side]))[:8]

    return {"index": record["index"], "density": record["density"], "negative_share": record["negative_share"],
            "max_positive": record["max_positive"], "max_negative": record["max_negative"],
            "positive_tokens": firing_tokens("positive"), "negative_tokens": firing_tokens("negative"),
            "promoted": [token for token, _ in record.get("promoted", [])[:5]]}


def write_browser(out: str | Path, records: list[dict[str, Any]], about: dict[str, Any],
                  chunk: int = CHUNK) -> Path:
    """Write the browser folder for `records` (latent_records), `about` describing the SAE and the pass."""
    out = Path(out)
    about = {**about, "latents": len(records), "chunk": chunk, "histogram_edges": histogram_edges()}
    with staged_folder(out) as staging:
        data = staging / "data"
        data.mkdir()
        write_data(data / "index", "sagsaeIndex", {"about": about, "rows": [index_row(r) for r in records]})
        for start in range(0, len(records), chunk):
            write_data(data / f"latents_{start}", "sagsaeLatents", {"start": start,
                                                                   "records": records[start:start + chunk]})
        (staging / "index.html").write_text(APP.read_text(encoding="utf-8"), encoding="utf-8")
    return out


def write_data(stem: Path, callback: str, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    stem.with_suffix(".json").write_text(text, encoding="utf-8")
    script = text.replace("</", "<\\/")  # "</" in a string must not end a script element that inlines the file
    stem.with_suffix(".js").write_text(f"{callback}({script});\n", encoding="utf-8")
