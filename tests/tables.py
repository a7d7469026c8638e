"""Reading the benchmark's printed tables back in tests."""

import re


def table_rows(text, startswith="# Train", contains=""):
    """Headers and rows (dicts) of the first tabulate 'simple' table whose header line starts with
    ``startswith`` and contains ``contains``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(startswith) and contains in line)
    headers = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(dict(zip(headers, re.split(r"\s{2,}", line.strip()))))
    return headers, rows
