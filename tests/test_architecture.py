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
            assert rel.startswith("models/"), f"{rel} imports diffusers"


def _family_reads(path: Path) -> list[int]:
    """Lines that read ``<x>.model.family`` or any ``<x>.extra`` attribute."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and (
                node.attr == "extra" or (node.attr == "family" and isinstance(node.value, ast.Attribute)
                                         and node.value.attr == "model")):
            out.append(node.lineno)
    return out


def test_only_the_registry_reads_model_family():
    """The family seam (docs/architecture.md): `model.family` is read in dmdr/families/registry.py only, and no
    bundle carries an untyped `extra` dict; trainers, monitors, eval, sampling and the CLI call the Family."""
    root = PKG.parent
    files = list(PKG.rglob("*.py")) + list((root / "cli").rglob("*.py"))
    bad = {p.relative_to(root).as_posix(): lines for p in files
           if p.relative_to(PKG.parent).as_posix() != "dmdr/families/registry.py" and (lines := _family_reads(p))}
    assert not bad, f"model.family / .extra read outside the registry: {bad}"


def test_trainers_monitors_and_t2i_eval_import_no_family_module():
    """They reach models only through the Family (and the family-neutral lora / weights helpers)."""
    neutral = ("dmdr.models.lora", "dmdr.models.weights", "dmdr.models.full_critic")
    for rel in ("train/dmdr.py", "train/grpo.py", "train/monitoring.py", "eval/t2i.py"):
        bad = [m for m in _imports(PKG / rel) if (m.startswith("dmdr.models") and m not in neutral)
               or m.startswith("dmdr.families.") and m not in ("dmdr.families.base", "dmdr.families.registry")
               or m == "dmdr.data.digits"]
        assert not bad, f"{rel} imports {bad}"
