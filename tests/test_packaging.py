"""What pyproject.toml declares: the torch floor that fastlm's safety rests on, and every
third-party package that fastlm's code imports."""
import ast
import importlib.metadata
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Imported by fastlm but not declared, and why that is right.
UNDECLARED = {
    "datasets": "read only when installed; the ImportError names the package to install",
    "starlette": "the framework fastapi is built on, installed and pinned by fastapi",
}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_modules() -> set[str]:
    mods = set()
    for f in [*(ROOT / "fastlm").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return mods - set(sys.stdlib_module_names) - {"fastlm", "kernels"}


def test_torch_floor_and_version_dependent_packages():
    project = _pyproject()
    deps = project["project"]["dependencies"]
    # torch.load(weights_only=True) is bypassable below 2.6 (CVE-2025-32434); triton_op and
    # FSDP2's fully_shard first appear in 2.6.
    assert "torch>=2.6" in deps and "torch>=2.6" in project["build-system"]["requires"]
    assert "tomli>=1.1; python_version < '3.11'" in deps  # tomllib is in the standard library from 3.11
    assert project["project"]["requires-python"] == ">=3.10"
    assert "jinja2>=3.1.6" in project["project"]["optional-dependencies"]["serve"]


def test_every_imported_package_is_declared():
    project = _pyproject()["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for reqs in project["optional-dependencies"].values():
        declared |= {_name(r) for r in reqs}
    dists = importlib.metadata.packages_distributions()
    missing = []
    for mod in sorted(_imported_modules() - set(UNDECLARED)):
        names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
        if not names & declared:
            missing.append(f"{mod} (distribution {sorted(names)})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_subpackage_is_installed():
    """setup.py lists its packages by name: a new folder of fastlm must be listed, or a
    non-editable install leaves it out."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    listed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            listed = {ast.literal_eval(e) for e in node.value.elts}
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastlm").rglob("__init__.py")}
    assert found and found <= listed, f"not in setup.py's packages: {sorted(found - listed)}"


def test_playground_files_are_package_data(tmp_path):
    """setup.py's build copies every file of the web playground (fastlm/serve/static/) beside
    the modules, so a wheel serves the page as a source checkout does."""
    import subprocess

    from fastlm.serve.playground import ROUTES

    static = ROOT / "fastlm" / "serve" / "static"
    files = sorted(p.name for p in static.iterdir())
    assert sorted(name for name, _ in ROUTES.values()) == files
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "build_py",
                    "--build-lib", str(tmp_path / "lib")], cwd=ROOT, check=True, capture_output=True, timeout=300)
    built = tmp_path / "lib" / "fastlm" / "serve" / "static"
    assert sorted(p.name for p in built.iterdir()) == files
    for name in files:
        assert (built / name).read_bytes() == (static / name).read_bytes(), name
