"""The package's shape as users meet it: the `biomass5head` console script and `python -m biomass5head` from any
folder, the spec's `python -m src.X` shims from the repository root, no installed top-level `src`, and the
layering of the package (imports only flow down its floors; no module over 350 lines)."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from biomass5head.cli import main as dispatcher

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "biomass5head"
SHIMS = {"train_5head": "train", "eval_5head_oof": "eval", "predict": "predict", "report": "report",
         "make_synthetic": "synthetic", "weights": "weights", "data": "check", "serve": "serve", "export": "export"}
# Floors from the bottom: a module imports from its own folder or from lower floors only. train and infer share a
# floor and never import each other.
FLOORS = {"core": 0, "synthetic": 1, "weights": 1, "data": 1, "model": 2, "train": 3, "infer": 3, "serve": 4,
          "cli": 5, "__main__": 6}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}  # what a user's shell has: only the installed package
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_dispatcher_lists_every_command_and_rejects_unknown_ones(capsys):
    assert dispatcher.main(["--help"]) == 0
    listed = capsys.readouterr().out
    for name in ("train", "eval", "predict", "report", "synthetic", "weights", "check"):
        assert f"  {name} " in listed
    assert dispatcher.main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err
    assert dispatcher.main([]) == 2


@pytest.mark.parametrize("name", sorted(dispatcher.COMMANDS))
def test_each_subcommand_shows_its_own_help_under_its_console_name(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        dispatcher.main([name, "--help"])
    assert exit_.value.code == 0
    assert f"usage: biomass5head {name}" in capsys.readouterr().out


@pytest.mark.slow  # four fresh interpreters: about 11 s on 2 cores
def test_console_script_and_module_run_from_any_folder(tiny_data, tmp_path):
    script = shutil.which("biomass5head", path=str(Path(sys.executable).parent))
    assert script, "the console script is not installed next to this Python"
    for command in ([script], [sys.executable, "-m", "biomass5head"]):
        proc = _run([*command, "check", str(tiny_data)], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "train.csv: 30 images" in proc.stdout
        missing = _run([*command, "check", str(tmp_path / "nowhere")], cwd=tmp_path)
        assert missing.returncode == 1 and "train.csv" in missing.stderr


def test_no_top_level_src_is_installed(tmp_path):
    probe = "import importlib.util as u; print(u.find_spec('src'), u.find_spec('biomass5head').origin)"
    out = _run([sys.executable, "-c", probe], cwd=tmp_path).stdout.split()
    assert out[0] == "None" and out[1] == str(PACKAGE / "__init__.py")


def test_spec_shims_are_tiny_and_answer_help_from_the_repository_root():
    shims = sorted((ROOT / "src").glob("*.py"))
    assert {p.stem for p in shims} == {*SHIMS, "__init__"}
    for path in shims:
        assert len(path.read_text().splitlines()) <= 10, path
    for module, command in SHIMS.items():
        text = (ROOT / "src" / f"{module}.py").read_text()
        assert f"from biomass5head.cli.{command} import main" in text
    for module in ("train_5head", "eval_5head_oof"):  # the specification's two entry points, run for real
        proc = _run([sys.executable, "-m", f"src.{module}", "--help"], cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert f"usage: python -m src.{module}" in proc.stdout


def _floor(module: str) -> tuple[str, int]:
    """(folder, floor) of a module: its subpackage, `core` for the modules directly in the package."""
    parts = module.split(".")
    folder = parts[1] if len(parts) > 2 or parts[-1] == "__main__" else "core"
    return folder, FLOORS[folder]


def _package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        yield path, name


def test_imports_flow_down_the_floors():
    wrong = []
    for path, module in _package_modules():
        folder, floor = _floor(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                wrong.append(f"{module}: relative import")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if not name.startswith("biomass5head.") or name.count(".") < 1:
                    continue
                if isinstance(node, ast.ImportFrom) and name in (f"biomass5head.{f}" for f in FLOORS):
                    name = f"{name}.{node.names[0].name}"  # `from biomass5head.infer import run`
                other, other_floor = _floor(name)
                if other != folder and (other_floor > floor or other_floor == floor):
                    wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_module_is_longer_than_350_lines():
    files = [p for p, _ in _package_modules()] + sorted((ROOT / "tests").rglob("*.py"))
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 350}
    assert not long
