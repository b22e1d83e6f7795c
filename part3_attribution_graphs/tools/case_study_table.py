"""The README's case-study table, read from the committed solutions notebook's outputs.

`python -m part3_attribution_graphs.tools.case_study_table` (or `make readme-case-study`) rewrites the
table in README.md's case-study section, from "| measure | result |" to the line naming the subspace
swap's site, so its figures are the notebook's printed ones; `--print` only prints it. Rebuild the
notebooks first (`make notebooks`) when the lesson's outputs change.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "solutions" / "part3_attribution_graphs_solutions.ipynb"
README = ROOT / "README.md"
HEADER = "| measure | result |"
SITE = "The subspace swap's site:"


def cell_outputs(notebook: dict) -> dict[str, str]:
    """`{cell id: its printed text}` for the notebook's code cells."""
    return {
        str(cell.get("id")): "".join("".join(out.get("text", "")) for out in cell.get("outputs", []))
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
    }


def case_study_table(notebook: dict) -> str:
    """The markdown table (and the site line after it) of the case study's printed figures."""
    out = cell_outputs(notebook)
    scores, subspace = out["case-all-scores"], out["case-subspace"]
    m = re.search(r"land latents: ([\d.]+%), against a base rate of ([\d.]+%) .*?: ([\d.]+x)", scores)
    p = re.search(r"own land: (\d+ of \d+)", scores)
    if m is None or p is None:
        raise ValueError("the case-all-scores cell's output lacks the enrichment or path-rate line")
    rows = [
        ("kept latents that are land latents / base rate / enrichment", f"{m[1]} / {m[2]} / {m[3]}"),
        ("strongest path through a latent of the question's own land", p[1]),
    ]
    for line in (out["case-interventions"] + subspace).splitlines():
        if ":" in line and " of " in line and not line.startswith("site:"):
            name, value = line.strip().rsplit(": ", 1)
            rows.append((name, value))
    site = re.search(r"site: (.*)", subspace)
    if site is None:
        raise ValueError("the case-subspace cell's output lacks its 'site:' line")
    table = "\n".join([HEADER, "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])
    return f"{table}\n\n{SITE} {site[1]}."


def with_table(readme: str, table: str) -> str:
    """The README text with its case-study table replaced by `table`."""
    start = readme.index(HEADER, readme.index("## The case study"))
    end = readme.index("\n", readme.index(SITE, start)) + 1
    return readme[:start] + table + "\n" + readme[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the table, leave README.md alone")
    args = parser.parse_args()
    table = case_study_table(json.loads(NOTEBOOK.read_text(encoding="utf-8")))
    if args.print:
        print(table)
        return
    text = with_table(README.read_text(encoding="utf-8"), table)
    fd, tmp = tempfile.mkstemp(dir=README.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, README)  # atomic: a failed write leaves the old README
    print(f"README.md case-study table rewritten from {NOTEBOOK.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
