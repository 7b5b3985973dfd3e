"""The numbers README.md and docs/*.md quote from results files, and the counts they type, against their sources.

Convention (also in docs/benchmarks.md, "Numbers quoted in the docs"):

- A quoted number is preceded by a marker naming its source:
      <!-- from FILE: QUERY; QUERY; ... -->
  FILE is a path from the repository root (a CSV or JSON file under results/). The marker covers the first
  n decimal numbers (digits with a decimal point, e.g. 37.4, -0.0, 96.7%; a digit inside a word such as the
  3 of TD3 or the 0 of v0 is no number) in the text after it, up to the next marker; n is the number of
  queries, and the i-th number is compared with the i-th query's value rounded to the decimals shown.
  In a table the marker sits inside the first cell it covers (`| name | <!-- from ... --> 9.2 ± 0.7 |`):
  a comment line between two rows would end the table.
- QUERY on a CSV file: `FIELD@COLUMN=VALUE,COLUMN=VALUE`: the column FIELD of the one row whose columns
  have those values (e.g. `mean@table=last,row=shipped/pendulum-medium-replay-v0,column=bc`).
- QUERY on a JSON file: a dotted key path; a step `KEY[K=V,K=V]` takes, from the list under KEY, the one
  item whose keys K have the values V (compared as text), e.g. `rows[method=sfbc,T=15].on_data`.
- A query may end in `*100` (a share quoted as a percentage) or `/60` (seconds quoted as minutes).
- A FILE with `*` in it (e.g. `results/quick/runs/bc/*/seed*/result.json`) quotes the mean of the query's
  values over the files it matches (at least one), e.g. a cell's mean wall time over its seeds.
- A typed count is preceded by `<!-- count: NAME -->` and is the first whole number after it, written
  in digits; NAME is one of COUNTS below, each counted from what it counts.
- A marker right after a backtick (an example in inline code, as in docs/benchmarks.md) is no marker.

Numbers measured outside any results file are said to be so in the text and carry no marker.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

MARKER = re.compile(r"(?<!`)<!--\s*from\s+(\S+?):\s*(.*?)\s*-->", re.S)
COUNT_MARKER = re.compile(r"(?<!`)<!--\s*count:\s*([\w-]+)\s*-->")
DECIMAL = re.compile(r"(?<![\w.])-?\d+\.\d+(?!\w|\.\d)")  # a sentence's full stop may follow
INTEGER = re.compile(r"(?<![\w.])\d+(?!\w|\.\d)")


def _cuda_cases() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import test_cuda
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return len(test_cuda.CASES)


def _quick_cells() -> int:
    from offbench.bench.grid import load_grid

    return len(load_grid(ROOT / "configs/grids/quick.yaml").cells)


def _quick_algorithms() -> int:
    from offbench.bench.grid import load_grid

    return len(load_grid(ROOT / "configs/grids/quick.yaml").algorithms)


def _perf_rows(path: str) -> int:
    return len(json.loads((ROOT / path).read_text())["training"])


COUNTS = {
    # configs/algorithms/*.yaml: the suite's algorithms
    "algorithm-configs": lambda: len(list((ROOT / "configs/algorithms").glob("*.yaml"))),
    # the columns of the quick grid (the configs and DiffCPS with EDP's action approximation)
    "quick-algorithms": _quick_algorithms,
    # configs/grids/quick.yaml expanded: algorithms x datasets x seeds
    "quick-cells": _quick_cells,
    # the cases of tests/test_cuda.py's compiled-against-eager test
    "cuda-cases": _cuda_cases,
    # the rows of results/perf/perf.json
    "perf-rows": lambda: _perf_rows("results/perf/perf.json"),
    # configs/toy/*.yaml: the methods of the toy bandit (`offbench toy` runs every one by default)
    "toy-configs": lambda: len(list((ROOT / "configs/toy").glob("*.yaml"))),
    # the models results/toy/table.json says it trained
    "toy-models": lambda: json.loads((ROOT / "results/toy/table.json").read_text())["protocol"]["models"],
}


def _split_conditions(text: str) -> dict[str, str]:
    conditions = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"condition {part!r} is not KEY=VALUE")
        conditions[key.strip()] = value.strip()
    return conditions


def _csv_value(path: Path, query: str) -> float:
    field, sep, where = query.partition("@")
    if not sep:
        raise ValueError(f"CSV query {query!r} is not FIELD@COLUMN=VALUE,...")
    conditions = _split_conditions(where)
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if all(r.get(k) == v for k, v in conditions.items())]
    if len(rows) != 1:
        raise ValueError(f"{len(rows)} rows of {path.name} match {where!r} (need exactly one)")
    return float(rows[0][field])


def _json_value(path: Path, query: str) -> float:
    node = json.loads(path.read_text())
    for step in query.split("."):
        m = re.fullmatch(r"([^\[\]]+)(?:\[(.*)\])?", step)
        if m is None:
            raise ValueError(f"bad step {step!r} in {query!r}")
        key, where = m.groups()
        node = node[int(key)] if isinstance(node, list) else node[key]
        if where is not None:
            conditions = _split_conditions(where)
            items = [x for x in node if all(str(x.get(k)) == v for k, v in conditions.items())]
            if len(items) != 1:
                raise ValueError(f"{len(items)} items match [{where}] in {query!r} (need exactly one)")
            node = items[0]
    return float(node)


def source_value(file: str, query: str) -> float:
    """The value QUERY selects in FILE (see the module docstring), with its scale applied."""
    if "*" in file:
        paths = sorted(ROOT.glob(file))
        assert paths, f"no file matches {file}"
        values = [source_value(p.relative_to(ROOT).as_posix(), query) for p in paths]
        return sum(values) / len(values)
    scale = 1.0
    m = re.fullmatch(r"(.*?)\s*([*/])\s*(\d+)", query)
    if m:
        query, op, factor = m.group(1), m.group(2), float(m.group(3))
        scale = factor if op == "*" else 1.0 / factor
    path = ROOT / file
    if path.suffix == ".csv":
        return _csv_value(path, query.strip()) * scale
    if path.suffix == ".json":
        return _json_value(path, query.strip()) * scale
    raise ValueError(f"{file}: only .csv and .json sources can be quoted")


def shown_matches(shown: str, value: float) -> bool:
    """`shown` is `value` rounded to the decimals `shown` has (-0.0 and 0.0 are the same)."""
    decimals = len(shown.split(".")[1])
    return float(f"{value:.{decimals}f}") == float(shown)


def quotes(text: str) -> list[tuple[int, str, str, str]]:
    """(line, file, query, shown number) of every marked quote in a document."""
    found = []
    markers = list(MARKER.finditer(text))
    for i, m in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        after = COUNT_MARKER.split(text[m.end() : end])[0]
        queries = [q.strip() for q in m.group(2).split(";") if q.strip()]
        numbers = DECIMAL.findall(after)
        line = text.count("\n", 0, m.start()) + 1
        if len(numbers) < len(queries):
            raise AssertionError(f"line {line}: {len(queries)} queries but only {len(numbers)} numbers follow")
        found += [(line, m.group(1), q, n) for q, n in zip(queries, numbers)]
    return found


def counts(text: str) -> list[tuple[int, str, int]]:
    """(line, counter name, typed count) of every count marker in a document."""
    found = []
    for m in COUNT_MARKER.finditer(text):
        number = INTEGER.search(text, m.end())
        assert number is not None, f"no whole number after the count marker {m.group(0)}"
        found.append((text.count("\n", 0, m.start()) + 1, m.group(1), int(number.group(0))))
    return found


def _all(collect):
    return [(doc.relative_to(ROOT).as_posix(), *item) for doc in DOCS for item in collect(doc.read_text())]


QUOTES = _all(quotes)
COUNTED = _all(counts)


def test_the_docs_mark_their_quotes():
    # every results folder the docs quote from has marked quotes (a marker lost in an edit shows here)
    sources = {file.split("/")[1] for _, _, file, _, _ in QUOTES}
    assert {"quick", "toy", "perf", "pgd"} <= sources, sources
    assert {name for _, _, name, _ in COUNTED} == set(COUNTS)


@pytest.mark.parametrize("doc,line,file,query,shown", QUOTES, ids=[f"{d}:{n}:{q}" for d, n, _, q, _ in QUOTES])
def test_quoted_number_matches_its_results_file(doc, line, file, query, shown):
    value = source_value(file, query)
    assert shown_matches(shown, value), f"{doc}:{line} shows {shown}; {file} [{query}] is {value!r}"


@pytest.mark.parametrize("doc,line,name,typed", COUNTED, ids=[f"{d}:{n}:{c}" for d, n, c, _ in COUNTED])
def test_typed_count_matches_what_it_counts(doc, line, name, typed):
    assert typed == COUNTS[name](), f"{doc}:{line} types {typed} for {name}, which counts {COUNTS[name]()}"


def test_the_checks_catch_a_wrong_quote():
    # the parsing and comparison fail on a changed number, a changed last digit and a missing number
    # (the quoted numbers are the committed results/quick's, read first, so the test outlives a rerun)
    source = "results/quick/table.csv"
    cell = "table=last,row=shipped/pendulum-medium-replay-v0,column=rebrac"
    mean, std = source_value(source, f"mean@{cell}"), source_value(source, f"std@{cell}")
    text = f"| x | <!-- from {source}: mean@{cell}; std@{cell} --> {mean:.1f} ± {std:.1f} |"
    (_, file, q1, n1), (_, _, q2, n2) = quotes(text)
    assert shown_matches(n1, source_value(file, q1)) and shown_matches(n2, source_value(file, q2))
    assert not shown_matches(f"{mean + 0.1:.1f}", source_value(file, q1))
    wrong_last_digit = f"{mean:.2f}"[:-1] + str((int(f"{mean:.2f}"[-1]) + 5) % 10)
    assert not shown_matches(wrong_last_digit, source_value(file, q1))  # more decimals, a stricter check
    with pytest.raises(AssertionError):
        quotes(text.replace(f" ± {std:.1f}", ""))
    assert [n for *_, n in quotes("<!-- from f.csv: a@b=c; d@e=f --> TD3+BC on v0: 4.5, then 1.2.")] == ["4.5", "1.2"]
    assert shown_matches("-0.0", -0.0337) and shown_matches("0.0", -0.0337)
