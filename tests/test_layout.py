"""The shape of the repository (docs/USAGE.md, "Files"): the top level holds the stage scripts a
user runs or copies and no other Python; helpers live in util/, programs that are neither stage
nor test in tools/. No import runs in a circle, and no core file (top level or util/) imports a
runnable stage as a library: what scripts share is a helper."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"tokenizer_pca", "ldae", "dit_baseline", "pretrain", "linprobe", "distill", "export_timm"}
RUNNABLE = {"pretrain", "linprobe", "distill", "export_timm"}   # the model files are libraries


def module_files():
    """{module name: path} of every project file, as its own folder's imports name it."""
    files = {}
    core = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "util", "*.py"))
    for path in core:
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        files[name.removesuffix(".__init__")] = path
    for folder in ("tools", "tests"):
        for path in glob.glob(os.path.join(ROOT, folder, "*.py")):
            files[f"{folder}/{os.path.basename(path)[:-3]}"] = path
    return files


def imports_of(path, known):
    """The project modules a file imports, at any depth (a function's lazy import counts)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            # tools/ and tests/ put their own folder on sys.path: `import gpu_check`
            for candidate in (name, f"tools/{name}", f"tests/{name}"):
                if candidate in known:
                    found.add(candidate)
    return found


def graph():
    files = module_files()
    return {name: imports_of(path, files) - {name} for name, path in files.items()}


def test_the_top_level_holds_the_stage_scripts_and_no_other_python():
    top = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert top == STAGES
    assert os.path.isfile(os.path.join(ROOT, "util", "__init__.py"))


def test_no_core_file_imports_a_runnable_stage():
    core = {name: deps for name, deps in graph().items() if "/" not in name}
    assert set(core) >= STAGES | {"util.cli", "util.registry", "util.engine"}   # it parsed them
    offenders = {name: sorted(deps & RUNNABLE) for name, deps in core.items() if deps & RUNNABLE}
    assert not offenders


def cycles_in(edges):
    """Every import circle a depth-first walk meets, as the list of modules around it."""
    found, done = [], set()

    def visit(name, path):
        for dep in sorted(edges.get(name, ())):
            if dep in path:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(name)
    for name in sorted(edges):
        if name not in done:
            visit(name, [name])
    return found


def test_no_import_runs_in_a_circle():
    edges = graph()
    assert not cycles_in(edges), cycles_in(edges)
    # the check sees an import and a circle: ldae imports tokenizer_pca, pretrain util.registry
    assert "tokenizer_pca" in edges["ldae"] and "util.registry" in edges["pretrain"]
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
