"""The dependency rules of docs/architecture.md, checked on the source text (imports)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "dmdr"
CORE = ["paths.py", "schedules.py", "samplers.py", "scores.py", "advantages.py", "keys.py"] + \
       [f"losses/{p.name}" for p in (PKG / "losses").glob("*.py")]
FORBIDDEN = ("diffusers", "transformers", "dmdr_cli", "dmdr.train", "typer")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_core_never_imports_frameworks_cli_or_trainers():
    for rel in CORE:
        p = PKG / rel
        if not p.exists():
            continue
        bad = [m for m in _imports(p) if m.split(".")[0] in ("diffusers", "transformers", "dmdr_cli", "typer")
               or m.startswith("dmdr.train")]
        assert not bad, f"{rel} imports {bad}"


def test_only_model_adapters_and_rewards_know_diffusers():
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).as_posix()
        if any(m.split(".")[0] == "diffusers" for m in _imports(p)):
            assert rel.startswith("models/") or rel in ("train/t2i_bundle.py",), f"{rel} imports diffusers"
