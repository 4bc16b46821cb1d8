"""The stages depend on wanda_serve's bottom layer and contract.py, never on one another; only the CLI and
the main job know them all (README, first section)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP = {"wanda_serve.cli", "wanda_serve.cli_export", "wanda_serve.cli_options", "wanda_serve.pipeline", "wanda_serve.__main__"}
STAGES = {"wanda_serve.jobs", "wanda_serve.recover"}  # wanda_serve's own stages: prune and recover


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at any depth of its code (a lazy import counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found |= {name for name in names if name.split(".")[0] in ("wanda_serve", "exporters", "deploy")}
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


@pytest.mark.parametrize("package, foreign", [("exporters", "deploy"), ("deploy", "exporters")])
def test_exporters_and_deploy_use_only_the_bottom_layer(package, foreign):
    for path in sorted((ROOT / package).glob("*.py")):
        imports = project_imports(path)
        assert not {name for name in imports if name.split(".")[0] == foreign}, f"{path.name} imports {foreign}"
        assert not imports & (TOP | STAGES), f"{path.name} imports {imports & (TOP | STAGES)}"


def test_only_the_cli_and_the_main_job_know_every_stage():
    for path in sorted((ROOT / "wanda_serve").glob("*.py")):
        if module_name(path) in TOP:
            continue
        imports = project_imports(path)
        assert not {name for name in imports if name.split(".")[0] in ("exporters", "deploy")}, path.name
        assert not imports & TOP, path.name


def test_contract_imports_nothing_but_the_errors():
    assert project_imports(ROOT / "wanda_serve" / "contract.py") == {"wanda_serve.errors"}
