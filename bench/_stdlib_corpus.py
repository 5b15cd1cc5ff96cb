"""The benchmark text: the .py files of the running interpreter's standard library (about
12 MB), without test directories, idlelib's tests and site-packages."""
import pathlib
import sysconfig


def stdlib_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts or "test" in parts or "tests" in parts:
            continue
        if parts[:2] == ("idlelib", "idle_test"):
            continue
        out.append(p)
    return out


def stdlib_texts() -> list[str]:
    texts = []
    for p in stdlib_files():
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts
