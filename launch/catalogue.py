"""The catalogue of official checkpoints as a table: `k5 variants`, `launch/generate.py --list-variants`, and the
README's table (tests/test_cli.py checks that the README holds exactly what ``markdown()`` prints).

    k5 variants                      # one aligned row per variant
    k5 variants --markdown           # the README table
    k5 variants --json --world-size 16
"""

from __future__ import annotations

import argparse
import json
import sys

# (column title, key of k5.engine.catalogue.variants.table's rows)
COLUMNS = (("variant", "variant"), ("task", "task"), ("steps", "steps"), ("guidance", "guidance"),
           ("attention", "attention"), ("size", "size"), ("MagCache", "magcache"), ("layout", "layout"),
           ("GiB/GPU", "memory_gib"))


def rows(world_size: int = 8) -> list[dict]:
    from k5.engine.catalogue.variants import table

    return table(world_size)


def _cell(row: dict, key: str) -> str:
    value = row[key]
    if key == "magcache":
        return "yes" if value else "-"
    if key == "guidance":
        return f"{value:g}"
    return str(value)


def text(world_size: int = 8) -> str:
    """Aligned columns for a terminal, then one line per variant with the repo it is downloaded from."""
    table = rows(world_size)
    cells = [[title for title, _ in COLUMNS]] + [[_cell(r, k) for _, k in COLUMNS] for r in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.append("")
    lines.append(f"layout and GiB/GPU (estimated peak per GPU) for {world_size} GPUs at the default size; repos "
                 f"(hf download REPO):")
    lines += [f"  {r['variant']}: {r['repo']}" for r in table]
    return "\n".join(lines)


def markdown(world_size: int = 8) -> str:
    """The README table: one row per variant, the repo id in the first column."""
    head = ["variant (repo `kandinskylab/Kandinsky-5.0-...`)", "steps", "guidance", "attention", "size (HxWxF)",
            "MagCache", f"layout on {world_size} GPUs", f"GiB per GPU ({world_size} GPUs)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows(world_size):
        repo = r["repo"].removeprefix("kandinskylab/Kandinsky-5.0-")
        out.append(f"| `{r['variant']}` (`{repo}`) | {r['steps']} | {r['guidance']:g} | {r['attention']} | "
                   f"{r['size']} | {_cell(r, 'magcache')} | `{r['layout']}` | {r['memory_gib']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="k5 variants", description="The official Kandinsky 5 checkpoints and the "
                                "settings their authors run them with (the defaults of --variant).")
    p.add_argument("--world-size", type=int, default=8, help="GPUs for the layout and memory columns (default 8)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the rows as JSON")
    fmt.add_argument("--markdown", action="store_true", help="the README's table")
    args = p.parse_args(argv)
    if args.world_size < 1:
        p.error(f"--world-size must be >= 1, got {args.world_size}")
    if args.json:
        print(json.dumps(rows(args.world_size), indent=1))
    else:
        print(markdown(args.world_size) if args.markdown else text(args.world_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
