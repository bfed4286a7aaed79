"""Every results table traces to a committed study file (issues 29 and 32.6).

A results table is a markdown table with a ``mean ± std`` cell in README.md, docs/results.md or
benchmarks/RESULTS.md. Its section (heading to next heading) must name at least one file of
``benchmarks/studies/`` that exists, and every ``mean ± std`` in the table must be one that those files
give: a point's summary, its runs pooled over the named files (a point whose seeds were trained in two
studies), a held-out figure, a baseline, or a probe's spread over split seeds (``benchmarks/probe_noise.py
--json``). A figure typed by hand, or a file renamed, fails here.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "benchmarks" / "studies"
DOCS = ("README.md", "docs/results.md", "benchmarks/RESULTS.md")
PAIR = re.compile(r"(\d+\.\d) ± (\d+\.\d)")
FILE = re.compile(r"([A-Za-z0-9_]+\.json)")


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) for each markdown section, split at every heading."""
    parts = re.split(r"^(#+ .*)$", text, flags=re.M)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)] + [("(top)", parts[0])]


def results_tables(body: str) -> list[str]:
    """The tables of a section that hold at least one ``mean ± std`` cell."""
    tables, current = [], []
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    return [t for t in tables if PAIR.search(t)]


def _pair(values: list[float]) -> tuple[float, float] | None:
    """(mean, sample std) in percent, as the study computes them; None under two seeds."""
    if len(values) < 2:
        return None
    return 100 * float(np.mean(values)), 100 * float(np.std(values, ddof=1))


def candidates(files: list[Path]) -> list[tuple[float, float]]:
    """Every (mean, std) in % that the named study files give."""
    out: list[tuple[float, float]] = []
    # (config, point, metric) -> one {seed: value} per file; pooled across files only where seeds are disjoint
    by_point: dict[tuple[str, str, str], list[dict[int, float]]] = defaultdict(list)
    for path in files:
        study = json.loads(path.read_text())
        if "summary" not in study:  # benchmarks/probe_noise.py --json: per checkpoint, the probe over split seeds
            out.extend(pair for entry in study.values() if (pair := _pair(entry["linear_top1"])))
            continue
        for point in study["summary"]:
            for key, mean in point.items():
                std = point.get(key.removesuffix("_mean") + "_std") if key.endswith("_mean") else None
                if std is not None and mean is not None:
                    out.append((100 * mean, 100 * std))
        config = " ".join(re.findall(r"--config=\S+", study.get("command", ""))) or path.name
        seeds: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
        for run in study["runs"]:
            if "failed" in run:
                continue
            point = json.dumps(run["overrides"], sort_keys=True)
            for key, value in {**run, **(run.get("heldout") or {})}.items():
                if isinstance(value, float) and key != "step":
                    seeds[(config, point, key)][run["seed"]] = value
        for ident, values in seeds.items():
            by_point[ident].append(values)
        for base in study.get("baselines", []):
            for key, value in base.items():
                std = base.get(f"{key}_std")
                if isinstance(value, float) and isinstance(std, float):
                    out.append((100 * value, 100 * std))
    for groups in by_point.values():
        out.extend(pair for values in groups if (pair := _pair(list(values.values()))))
        pooled = {seed: v for values in groups for seed, v in values.items()}
        if len(groups) > 1 and len(pooled) == sum(map(len, groups)) and (pair := _pair(list(pooled.values()))):
            out.append(pair)
    return out


def _cases() -> list[tuple[str, str, str, str]]:
    """(document, heading, section body, table) for every results table."""
    return [(doc, heading, body, table) for doc in DOCS for heading, body in sections((ROOT / doc).read_text())
            for table in results_tables(body)]


CASES = _cases()


def test_there_are_results_tables_to_check():
    docs = {doc for doc, *_ in CASES}
    assert docs == set(DOCS), docs  # each document still has its tables (a parse that finds none checks nothing)


@pytest.mark.parametrize("doc,heading,body,table", CASES, ids=[f"{d}:{h[:60]}" for d, h, *_ in CASES])
def test_results_table_traces_to_a_committed_study(doc, heading, body, table):
    names = sorted(set(FILE.findall(body)))
    files = [STUDIES / n for n in names if (STUDIES / n).is_file()]
    assert files, f"{doc} '{heading}': a results table whose section names no file of benchmarks/studies/ ({names})"
    known = candidates(files)
    for mean, std in ((float(m), float(s)) for m, s in PAIR.findall(table)):
        assert any(abs(mean - m) <= 0.051 and abs(std - s) <= 0.051 for m, s in known), (
            f"{doc} '{heading}': {mean} ± {std} is in no study of {[f.name for f in files]}")
