"""The project's structural rules: what a script may import, and that importing one does nothing."""

import ast
import os
import subprocess
import sys

from conftest import ROOT

SCRIPTS = ["sft.py", "reward_model.py", "ppo.py", "ilql.py", "dpo.py", "rft.py"]
SHARED = ["parallel.py", "kernels.py"]
ALLOWED = {"torch", "transformers", "tokenizers", "numpy", "tqdm", "tyro", "wandb"}


def top_level_imports(path):
    """Root module names imported at module level (imports inside functions are lazy extras and allowed)."""
    tree = ast.parse(open(path).read())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append((node.module or "").split(".")[0] if node.level == 0 else ".")
    return names


def present(files):
    return [name for name in files if os.path.exists(os.path.join(ROOT, name))]


def test_scripts_import_only_the_declared_dependencies():
    assert "sft.py" in present(SCRIPTS)
    for name in present(SCRIPTS + SHARED):
        allowed = ALLOWED | set(sys.stdlib_module_names) | {"parallel", "kernels"}
        bad = [module for module in top_level_imports(os.path.join(ROOT, name)) if module not in allowed]
        assert not bad, f"{name} imports {bad} at top level; import optional extras inside the function that needs them"


def test_no_script_imports_another_script():
    for name in present(SCRIPTS + SHARED):
        others = {script[:-3] for script in SCRIPTS}
        # Imports inside functions count too: a script never leans on another one.
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        for node in ast.walk(tree):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not {m.split(".")[0] for m in modules} & others, f"{name} imports another algorithm script"


def test_import_rule_catches_a_bad_import(tmp_path):
    # The checker itself must be able to fail.
    path = tmp_path / "bad.py"
    path.write_text("import os\nimport pandas\nfrom . import x\n\ndef f():\n    import scipy\n")
    assert top_level_imports(path) == ["os", "pandas", "."]


def test_importing_a_script_has_no_side_effects(tmp_path):
    """Importing a script prints nothing and writes nothing. One fresh interpreter imports the scripts
    in turn (an interpreter per script spent 6 s each on importing torch and transformers) and reports
    after each import, so what an import printed or wrote is pinned on the script that did it."""
    names = [name[:-3] for name in present(SCRIPTS)]
    code = (
        "import importlib, os, sys\n"
        "sys.argv = ['x', '--help-not-parsed']\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    print(f'\\0{name} wrote {os.listdir()}', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr
    printed, *reports = result.stdout.split("\0")  # what the first import printed; then each report
    assert len(reports) == len(names), result.stdout
    for name, report in zip(names, reports):
        assert printed == "", f"importing {name} printed {printed!r}"
        wrote, _, printed = report.partition("\n")  # and what the next import printed
        assert wrote == f"{name} wrote []", f"importing {wrote}"


def test_every_args_field_has_a_docstring():
    for name in present(SCRIPTS):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        args = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args")
        body = args.body
        for index, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                following = body[index + 1] if index + 1 < len(body) else None
                has_doc = (
                    isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                )
                assert has_doc, f"{name}: Args.{node.target.id} has no docstring (it is the --help text)"
