"""The layering of a tree, measured: package pairs that import each other (directly or
through others), the five largest files, and which service packages services/common imports.

    python scripts/measure_layers.py [TREE]     # default: this checkout

Packages are proto and each services.<name>; every import statement counts, including those
inside functions (grimp reads them all).
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import grimp


def packages(graph: grimp.ImportGraph) -> list[str]:
    names = {".".join(m.split(".")[:2]) for m in graph.modules if m.startswith("services.")}
    return [*sorted(names), "proto"]


def cycles(graph: grimp.ImportGraph, names: list[str]) -> list[tuple[str, str]]:
    def reaches(a: str, b: str) -> bool:
        return graph.chain_exists(importer=a, imported=b, as_packages=True)

    return [(a, b) for a, b in itertools.combinations(names, 2) if reaches(a, b) and reaches(b, a)]


def largest(tree: Path, count: int = 5) -> list[tuple[int, str]]:
    files = [*tree.glob("services/**/*.py"), *tree.glob("proto/**/*.py")]
    sizes = ((len(f.read_text().splitlines()), str(f.relative_to(tree))) for f in files)
    return sorted(sizes, reverse=True)[:count]


def common_imports(tree: Path) -> list[str]:
    found = set()
    for path in (tree / "services" / "common").glob("*.py"):
        found |= set(re.findall(r"^\s*(?:from|import) (services\.\w+)", path.read_text(), re.M))
    return sorted(found - {"services.common"})


def main() -> int:
    tree = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    sys.path.insert(0, str(tree))
    graph = grimp.build_graph("services", "proto", cache_dir=None)
    pairs = cycles(graph, packages(graph))
    print(f"{tree}: {len(pairs)} package pairs in an import cycle")
    for a, b in pairs:
        print(f"  {a} <-> {b}")
    print("largest files:", ", ".join(f"{path} {n}" for n, path in largest(tree)))
    print("services.common imports:", ", ".join(common_imports(tree)) or "no other package")
    return 0


if __name__ == "__main__":
    sys.exit(main())
