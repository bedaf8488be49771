"""Every kernel on every zoo architecture (tests/zoo.py): the table of issue 17 in RESULTS.md.

    python benchmarks/zoo_matrix.py [names...]     # all architectures when none are named

For each: prune at keep 0.5 (groups pruned / asked; refused ones with why), the masked-equivalence
check on re-randomized weights and its negative control, other batch and sequence sizes, generate,
W8 / W4 / W8A8 (SQNR of the fake-quant model against float; of the deploy form against the
fake-quant model), the share of weights left in float. Prints a Markdown table and the reasons.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from zoo import ALL
from zoo_check import check

COLUMNS = ["model", "kind", "prune", "masked", "negative", "other_sizes", "generate", "w8", "w4",
           "w8a8", "float_share", "full"]  # fmt: skip


def main(names: list[str]) -> int:
    warnings.filterwarnings("ignore")
    rows = []
    for name in names or ALL:
        started = time.perf_counter()
        row = check(name)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(f"{name}: {'full' if row['full'] else 'NOT full'} ({row['seconds']:.1f} s)",
              file=sys.stderr)  # fmt: skip
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        cells = []
        for key in COLUMNS:
            value = row.get(key, "")
            if key == "float_share" and isinstance(value, float):
                value = f"{value:.0%}"
            cells.append(str(value).replace("|", "/"))
        print("| " + " | ".join(cells) + " |")
    full = sum(r["full"] for r in rows)
    print(f"\nfull successes: {full} of {len(rows)} ({full / len(rows):.0%})")
    for row in rows:
        notes = {**row.get("refused", {}), **{k: row[k] for k in row.get("failures", [])},
                 **{k: v for k, v in row.get("no_form", {}).items()}}  # fmt: skip
        for key, reason in notes.items():
            print(f"- {row['model']}: {key}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
