"""Build examples/python_stdlib.jsonl: a real filename -> description set from the Python standard
library (each module file and the first line of its docstring), so lexlora's quick try needs no
downloaded data.

    python scripts/build_stdlib_examples.py [--out examples/python_stdlib.jsonl]
"""

import argparse
import ast
import json
import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def first_line(docstring: str) -> str:
    for line in docstring.strip().splitlines():
        line = line.strip()
        if line:
            return line
    return ""


def collect(root: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts) or rel.name.startswith("_") and rel.name != "__init__.py":
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        line = first_line(doc or "")
        # Keep sentences that describe the file, not usage banners or licence lines.
        if not 12 <= len(line) <= 160 or line.lower().startswith(("usage", "copyright", "this file is")):
            continue
        name = rel.parent.as_posix() + ".py" if rel.name == "__init__.py" else rel.as_posix()
        rows.append({"filename": name, "description": line})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="examples/python_stdlib.jsonl")
    args = parser.parse_args()
    rows = collect(Path(sysconfig.get_paths()["stdlib"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for index, row in enumerate(rows):
            handle.write(json.dumps({"id": str(index), **row}) + "\n")
    print(f"{len(rows)} records -> {out}")


if __name__ == "__main__":
    main()
