"""Family knowledge is written once: no diffusion family id or sampler name as a string literal
outside the catalog (studio/families.py) and the family's own files."""

from __future__ import annotations

import ast
from pathlib import Path

from studio import families

STUDIO = Path(__file__).resolve().parent.parent / "studio"
FAMILY_IDS = {f.id for f in families.FAMILIES.values() if f.kind in (families.Kind.IMAGE, families.Kind.VIDEO)}
SAMPLER_IDS = set(families.DIFFUSION_SAMPLERS) - {"euler", "ddim", "lcm"}  # words that also name other things

# A family's own files: its model code and its pipeline module know its name.
OWN_FILES = ("families.py", "models/", "engine/pipelines/diffusion/")
# The sampler implementations register their names in their own tables.
SAMPLER_FILES = ("families.py", "engine/samplers.py")


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _offenders(names: set[str], allowed: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted(STUDIO.rglob("*.py")):
        rel = path.relative_to(STUDIO).as_posix()
        if rel.startswith(allowed):
            continue
        found += [f"studio/{rel}:{line}: {value!r}" for line, value in _literals(path) if value in names]
    return found


def test_no_family_id_literal_outside_the_catalog_and_the_familys_own_files():
    offenders = _offenders(FAMILY_IDS, OWN_FILES)
    assert not offenders, "use studio.families (e.g. families.SDXL) instead of:\n" + "\n".join(offenders)


def test_no_sampler_list_outside_the_catalog():
    offenders = _offenders(SAMPLER_IDS, SAMPLER_FILES)
    assert not offenders, "read samplers from studio.families instead of:\n" + "\n".join(offenders)
