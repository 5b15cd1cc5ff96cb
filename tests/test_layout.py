"""The library's layout: no circle among the module-level imports of fastlm's modules (kernels
included), and one sampler, one set of stop rules and one decode forward shared by generation
and the server: the same seeded request gives the same tokens through either."""
import ast
import importlib.util
import threading
from pathlib import Path

import pytest
import torch

import fastlm
from fastlm.generation import Engine, Request, generate, sampling_options

from _serve import TEXT, make_model


# ----------------------------------------------------------------------------- the import graph
def _modules(root: Path, package: str) -> dict:
    """{module name: (file, is a package)} for every .py file under ``root`` (the folder of
    ``package``)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join([package, *parts])] = (f, is_pkg)
    return out


def _import_time_nodes(body):
    """The import statements a module runs when it is imported: at its top level, in its
    classes' bodies and in top-level if/try/with/loop blocks, not in functions (run later) nor
    under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _import_time_nodes(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from _import_time_nodes(inner)


def _ancestors(name: str) -> list:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict) -> dict:
    """{module: set of the package's modules it imports at import time}. ``from a import b``
    counts as importing ``a.b`` when that is a module, else ``a``; importing a module also runs
    its packages' ``__init__``, so those count too, except the importer's own packages (which
    are already being imported when it runs)."""
    graph = {}
    for name, (path, is_pkg) in modules.items():
        here = name if is_pkg else name.rpartition(".")[0]
        targets = set()
        for node in _import_time_nodes(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                bases, names = [a.name for a in node.names], []
            else:
                if node.level:
                    base = here
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module
                bases, names = [base], [a.name for a in node.names]
            for base in bases:
                hits = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
                if len(hits) < len(names) or not names:
                    hits.append(base)
                for t in hits:
                    for m in _ancestors(t) + [t]:
                        if m in modules and m != name and m not in _ancestors(name):
                            targets.add(m)
        graph[name] = targets
    return graph


def find_cycle(graph: dict) -> list | None:
    """One circle of the graph as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _fastlm_modules() -> dict:
    mods = _modules(Path(fastlm.__file__).parent, "fastlm")
    spec = importlib.util.find_spec("fastlm.kernels")  # the top-level kernels/, installed as fastlm.kernels
    if spec is not None and spec.submodule_search_locations:
        kroot = Path(list(spec.submodule_search_locations)[0])
        if kroot.resolve() != (Path(fastlm.__file__).parent / "kernels").resolve():
            mods.update(_modules(kroot, "fastlm.kernels"))
    return mods


def test_no_import_circle():
    mods = _fastlm_modules()
    graph = import_graph(mods)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # the walk sees what it should: relative, parent-package and `from . import x` forms, and kernels
    assert "fastlm.models.decode" in graph["fastlm.generation.cache"]
    assert "fastlm.models" in graph["fastlm.generation.cache"]
    assert "fastlm.ops" in graph["fastlm.models.layers"]
    assert "fastlm.reference" in graph["fastlm.ops"]
    if "fastlm.kernels" in mods:
        assert "fastlm.kernels" in graph["fastlm.ops"]
        assert any(m.startswith("fastlm.kernels.") for m in graph["fastlm.kernels"])


def test_layers_import_downward_only():
    """The models know nothing of generation, serving, training or pipelines at import time."""
    graph = import_graph(_fastlm_modules())
    above = ("fastlm.generation", "fastlm.serve", "fastlm.train", "fastlm.pipelines", "fastlm.finetune",
             "fastlm.evaluate", "fastlm.cli")
    for name, targets in graph.items():
        if name.startswith(("fastlm.models", "fastlm.ops", "fastlm.kernels", "fastlm._io", "fastlm.reference")):
            assert not [t for t in targets if t.startswith(above)], (name, targets)
    assert graph["fastlm._io"] == set()


def test_setup_installs_every_package():
    """setup.py lists its packages by name: a subpackage missing there is left out of a wheel."""
    setup = Path(__file__).resolve().parents[1] / "setup.py"
    call = next(n for n in ast.walk(ast.parse(setup.read_text())) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    listed = set(ast.literal_eval(next(k.value for k in call.keywords if k.arg == "packages")))
    root = Path(fastlm.__file__).parent
    found = {".".join(("fastlm",) + f.parent.relative_to(root).parts) for f in root.rglob("__init__.py")}
    assert found - {"fastlm.kernels"} <= listed and "fastlm.kernels" in listed, sorted(found - listed)


def test_cycle_finder_sees_circles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .sub import b\n\ndef f():\n    from . import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import os\nif True:\n    from .. import c\n")
    (pkg / "c.py").write_text("class K:\n    from .a import f\n")
    mods = _modules(pkg, "pkg")
    graph = import_graph(mods)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}  # the function-level import of c does not count
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("def later():\n    from .a import f\n")
    assert find_cycle(import_graph(_modules(pkg, "pkg"))) is None


# ----------------------------------------------------------------------------- one sampler, one decode path
@pytest.fixture(scope="module")
def tok():
    return fastlm.Tokenizer.train([TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok, pad=5)  # ids past the tokenizer's vocabulary: masked alike by both


def _through_engine(model, tok, requests, max_batch=8):
    """Token lists per (request, sequence), each request (prompts, options, seed) submitted
    together to one engine."""
    eng = Engine(model, tok, max_batch=max_batch)
    out = [dict() for _ in requests]
    done = threading.Semaphore(0)
    try:
        for k, (prompts, opts, seed) in enumerate(requests):
            def emit(ev, k=k):
                if ev[0] == "token":
                    out[k].setdefault(ev[1], []).append(ev[2])
                elif ev[0] == "finish":
                    done.release()
                elif ev[0] == "error":
                    raise AssertionError(ev)
            eng.submit(Request(prompts, opts, emit, seed=seed))
        for _ in range(sum(len(p) for p, _, _ in requests)):
            assert done.acquire(timeout=60)
    finally:
        eng.stop()
    return [[d[i] for i in sorted(d)] for d in out]


SAMPLING = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95)


def _opts(model, tok, prompts, n, sampling=True):
    kw = SAMPLING if sampling else dict(do_sample=False, temperature=1.0, top_k=None, top_p=None)
    return sampling_options(model, [len(p) for p in prompts], n, None, kw["do_sample"], kw["temperature"], kw["top_k"],
                            kw["top_p"], 1.0, None, None, tok, False, 0, "stop")


@pytest.mark.parametrize("sampling", [True, False])
def test_same_seeded_request_same_tokens_through_generate_and_the_engine(model, tok, sampling):
    prompts = [tok.encode(t) for t in ("To be, or not", "the sea", "whether 'tis nobler in the mind", "arrows")]
    n = 24
    kw = SAMPLING if sampling else {}

    def lib(ps, seed, n=n):
        out = generate(model, ps, max_new_tokens=n, seed=seed, tokenizer=tok, return_dict_in_generate=True, **kw)
        return out.tokens

    # alone: one prompt, one sequence
    alone = lib([prompts[0]], 11)
    assert _through_engine(model, tok, [([prompts[0]], _opts(model, tok, [prompts[0]], n, sampling), 11)]) == [alone]
    # batched: several prompts in one request, and beside other requests sharing the engine's steps
    batch = lib(prompts, 11)
    assert batch[0] == alone[0]  # a row's draws do not depend on the rows beside it
    others = [([p], _opts(model, tok, [p], n // 2 + i, sampling), 100 + i) for i, p in enumerate(reversed(prompts))]
    mine = (prompts, _opts(model, tok, prompts, n, sampling), 11)
    got = _through_engine(model, tok, others[:2] + [mine] + others[2:])
    assert got[2] == batch
    assert got[0] == lib([prompts[-1]], 100, n // 2)  # the other requests, too, match generate with their seed
    assert got[3] == lib([prompts[1]], 102, n // 2 + 2)
    if sampling:
        assert len({tuple(t) for t in batch}) == len(batch)
        assert lib(prompts, 12) != batch  # the seed matters
