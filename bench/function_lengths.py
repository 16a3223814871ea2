"""Report: functions and methods in ``universal/`` and ``app.py`` longer than a line limit.

The length of a function is ``end_lineno - lineno + 1`` of its ``def`` node (``ast``), docstring and nested
functions included; decorators are not counted. Prints a markdown table sorted longest first and the count. Always
exits 0: this is a report, not a test.

Usage: ``python bench/function_lengths.py [--limit 60] [--max N]``
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sources(root: Path) -> list[Path]:
    """The Python files of the package and the app, in a stable order."""
    files = sorted((root / "universal").rglob("*.py"))
    app = root / "app.py"
    return files + ([app] if app.exists() else [])


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """Yield ``(qualified name, node)`` for every function, method and nested function of ``tree``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            yield name, node
            yield from _functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def long_functions(root: Path = ROOT, limit: int = 60) -> list[tuple[int, str, str, int]]:
    """Return ``(length, file, qualified name, first line)`` of functions longer than ``limit``, longest first.

    A file that does not parse (someone is editing it) is reported on stderr and skipped.
    """
    rows = []
    for path in _sources(root):
        rel = path.relative_to(root).as_posix()
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError) as exc:
            print(f"skipped {rel}: {exc}", file=sys.stderr)
            continue
        for name, node in _functions(tree):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                rows.append((length, rel, name, node.lineno))
    return sorted(rows, key=lambda r: (-r[0], r[1], r[3]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=60, help="report functions longer than this (lines)")
    parser.add_argument("--max", type=int, default=None, help="show at most this many rows")
    args = parser.parse_args(argv)
    rows = long_functions(ROOT, args.limit)
    print(f"{len(rows)} functions longer than {args.limit} lines\n")
    print("| lines | file | function | line |")
    print("|---:|---|---|---:|")
    for length, rel, name, lineno in rows[: args.max]:
        print(f"| {length} | {rel} | {name} | {lineno} |")
    return 0


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
    raise SystemExit(0)
