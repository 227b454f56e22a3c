"""The package's import graph: layers bottom to top (implementation -> public API -> settings and command
pipelines -> entry shims), every arrow pointing down or sideways, no circle, no private name across
modules, no alias or submodule that takes a public name. Read from the source with ast (lazy imports
inside functions included), so nothing is imported to check it."""

import ast
import os

import pytest

import sleb
from clitools import ROOT

PACKAGES = ("sleb", "eval", "latency")
ENTRY = {"sleb.__main__", "sleb.heal", "eval", "eval.__main__", "latency", "latency.__main__"}
COMMANDS = {"sleb.cli", "sleb.settings", "sleb.stages", "sleb.run_search", "sleb.run_eval", "sleb.run_heal",
            "sleb.latency", "sleb.report", "sleb.commands"}
API = {"sleb", "sleb.api"}
LAYERS = ("implementation", "public API", "settings and commands", "entry shims")


def layer(module: str) -> int:
    if module in ENTRY:
        return 3
    if module in COMMANDS:
        return 2
    if module in API:
        return 1
    return 0


def _modules() -> dict:
    """{dotted name: path} of every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if file.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].split(os.sep)
                    found[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, file)
    return found


MODULES = _modules()


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer if MODULES[importer].endswith("__init__.py") else importer.rsplit(".", 1)[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(importer: str):
    """(target module, imported name or None, local alias, line) for every import of our packages."""
    tree = ast.parse(open(MODULES[importer]).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, None, alias.asname, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(importer, node)
            if target.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:
                    yield submodule, None, alias.asname, node.lineno
                else:
                    yield target, alias.name, alias.asname, node.lineno


def _graph() -> dict:
    return {module: {target for target, *_ in imports(module) if target != module} for module in MODULES}


def test_every_import_points_down_or_sideways():
    upward = [f"{module}:{line} ({LAYERS[layer(module)]}) imports {target} ({LAYERS[layer(target)]})"
              for module in MODULES for target, _, _, line in imports(module) if layer(target) > layer(module)]
    assert not upward


def test_no_import_circle():
    graph, state, circles = _graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles


def test_no_private_name_crosses_modules():
    crossings = []
    for module in MODULES:
        bound = {}  # local name -> our module it stands for
        for target, name, asname, line in imports(module):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                crossings.append(f"{module}:{line} imports {target}.{name}")
            if name is None:
                bound[asname or target.split(".")[-1]] = target
        tree = ast.parse(open(MODULES[module]).read())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                crossings.append(f"{module}:{node.lineno} reads {bound[node.value.id]}.{node.attr}")
    assert not crossings


def test_no_alias_or_submodule_takes_a_public_name():
    public = set(sleb.__all__)
    aliases = [f"{module}:{line} imports {target}{'.' + name if name else ''} as {asname}"
               for module in MODULES for target, name, asname, line in imports(module)
               if asname in public and asname != name]
    assert not aliases
    submodules = {name.split(".")[1] for name in MODULES if name.startswith("sleb.")}
    assert submodules & public == {"heal"}  # the `python -m sleb.heal` shim, which hands the name back:


def test_importing_the_heal_shim_is_refused_and_keeps_the_api_function():
    import sleb.api

    with pytest.raises(ImportError, match="sleb.heal is the healing function"):
        import sleb.heal  # noqa: F401
    assert sleb.heal is sleb.api.heal and callable(sleb.heal)


def test_no_module_replaces_itself_in_sys_modules():
    found = [name for name, path in MODULES.items() if "sys.modules[__name__]" in open(path).read()]
    assert not found


@pytest.mark.parametrize("layer_name", LAYERS)
def test_each_layer_has_modules(layer_name):
    """The table above names real modules (a renamed one would silently fall into 'implementation')."""
    named = ENTRY | COMMANDS | API
    assert named <= set(MODULES), named - set(MODULES)
    assert any(LAYERS[layer(module)] == layer_name for module in MODULES)


def test_every_package_is_installed():
    """`pip install .` ships the packages pyproject.toml lists: a new subpackage (sleb/recovery) left out of
    the list imports from the repository but not after an install."""
    import tomllib

    listed = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]["packages"])
    found = {name for name, path in MODULES.items() if path.endswith("__init__.py")}
    checkout_only = {"eval", "latency"}  # the paper's `python -m eval` / `latency`, run from a checkout
    assert found - checkout_only == listed and not listed & checkout_only


def test_tests_and_benchmarks_bind_no_public_name_to_another_module():
    """`from sleb import metrics as search` in a test read as if it were sleb.search: tests and benchmarks
    import our modules under their own names."""
    public = set(sleb.__all__)
    found = []
    for folder in ("tests", "bench"):
        for file in sorted(os.listdir(os.path.join(ROOT, folder))):
            if not file.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(ROOT, folder, file)).read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    source = node.module if isinstance(node, ast.ImportFrom) else None
                    for alias in node.names:
                        target = f"{source}.{alias.name}" if source else alias.name
                        if target.split(".")[0] in PACKAGES and alias.asname in public and alias.asname != alias.name:
                            found.append(f"{folder}/{file}:{node.lineno} imports {target} as {alias.asname}")
    assert not found


def test_metric_names_are_compared_only_in_the_registry():
    """What a metric can do is read from its record in sleb/metrics.py: a module that compares --metric with
    a name ("evopress", "sleb_compensated") is a second, drifting copy of that record. ("sleb" is also the
    command's and the package's name, so the paper's metric is read as metrics.PAPER and not looked for.)"""
    from sleb.metrics import METRICS, PAPER

    found = []
    for module, path in MODULES.items():
        if module == "sleb.metrics":
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            named = []
            if isinstance(node, ast.Compare):
                named = [side for side in [node.left, *node.comparators]]
                named += [element for side in node.comparators if isinstance(side, (ast.Tuple, ast.List, ast.Set))
                          for element in side.elts]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("startswith", "endswith"):
                named = list(node.args)
            found += [f"{module}:{node.lineno} compares with {side.value!r}" for side in named
                      if isinstance(side, ast.Constant) and side.value in set(METRICS) - {PAPER}]
    assert not found


def test_the_design_page_draws_every_module_in_its_layer():
    """docs/design.md's drawing names each module once, inside the box of the layer this file assigns it."""
    import re

    text = open(os.path.join(ROOT, "docs", "design.md")).read()
    drawing = text.split("```text", 1)[1].split("```", 1)[0]
    drawn, current = {}, None
    for line in drawing.splitlines():
        header = re.match(r"\+- (.+?) -", line)
        if header:
            current = header.group(1)
            continue
        for token in re.findall(r"[\w/]+\.py", line):
            path = token if token.split("/")[0] in PACKAGES else f"sleb/{token}"
            name = path[:-3].replace("/", ".").removesuffix(".__init__")
            assert name not in drawn, f"{name} drawn twice"
            drawn[name] = current
    assert set(drawn) == set(MODULES), (set(MODULES) - set(drawn), set(drawn) - set(MODULES))
    misplaced = {name: where for name, where in drawn.items() if where != LAYERS[layer(name)]}
    assert not misplaced
