"""What the documentation knows about the package, read from its source without importing it.

Two things are derived here, both statically (griffe and `ast`: no backend, no Keras import):

- the **public API**: every public module of `keras_dbmtl` (a module whose dotted path has no part starting with
  an underscore) and its public objects (its `__all__` where that is a static list, otherwise the classes and
  functions it defines without a leading underscore; for `keras_dbmtl.balancers` the static part of `__all__`
  plus every class registered with `@register`). A new module appears in the reference by existing.
- the **balancers**: every `@register("name")` class of `keras_dbmtl/balancers/*.py`, with its kind (the base
  class it derives from: `LossBalancer`, `GramianBalancer`, `JacobianBalancer`), constructor defaults, the ranges
  its `check_hyperparameters` call allows, its state variables, its test file and its paper's citation.
"""

from __future__ import annotations

import ast
import functools
import re
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "keras_dbmtl"
BALANCERS = PACKAGE / "balancers"
KINDS = {"LossBalancer": "loss", "GramianBalancer": "Gramian", "JacobianBalancer": "Jacobian"}
COST = {"loss": "1 backward pass", "Gramian": "T backward passes + the T × T Gramian",
        "Jacobian": "T backward passes + T × P per-task gradients"}

# Public objects allowed without a docstring of their own, with the reason (anything else undocumented fails the
# build). Keys are dotted prefixes.
UNDOCUMENTED_OK = {
    "keras_dbmtl.gradients": "the backend contract for backend authors: its primitives are listed and explained "
                             "in the module docstring and CONTRIBUTING.md (Adding backend code)",
}
# Command-line entry points: documented as commands in their module's docstring.
ENTRY_POINTS = {"main"}


@functools.lru_cache(maxsize=None)
def package():
    import griffe

    return griffe.load("keras_dbmtl", search_paths=[str(ROOT)], allow_inspection=False, resolve_aliases=False)


def _is_public(path):
    return not any(part.startswith("_") for part in path.split("."))


def public_modules():
    """Dotted paths of every public module and package, parents first."""
    found = []

    def walk(module):
        found.append(module.path)
        for name, child in sorted(module.members.items()):
            if child.is_alias or not child.is_module or not _is_public(child.path):
                continue
            walk(child)

    walk(package())
    return found


def _module(path):
    obj = package()
    for part in path.split(".")[1:]:
        obj = obj.members[part]
    return obj


def _static_exports(module):
    """The names of a module's `__all__`: griffe's reading, or the literal list of `__all__ = [...] + ...`."""
    try:
        exports = module.exports
    except Exception:  # noqa: BLE001 - a dynamic __all__ griffe cannot evaluate
        exports = None
    if exports:
        return [str(getattr(name, "name", name)) for name in exports]
    filepath = getattr(module, "filepath", None)
    if not filepath or not Path(filepath).exists():
        return None
    for node in ast.parse(Path(filepath).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            value = node.value.left if isinstance(node.value, ast.BinOp) else node.value
            if isinstance(value, (ast.List, ast.Tuple)):
                return [e.value for e in value.elts if isinstance(e, ast.Constant)]
    return None


def canonical(module, name):
    """The dotted path where `module.name` is defined (aliases followed inside the package), or None."""
    member = module.members.get(name)
    if member is None:
        return None
    if member.is_alias:
        target = member.target_path
        return target if target.startswith("keras_dbmtl") else None
    return member.path


def public_objects(module_path):
    """The public classes and functions of one module: dotted path -> griffe object (canonical paths)."""
    module = _module(module_path)
    registered = {f"keras_dbmtl.balancers.{b['module']}": b for b in balancers()}
    if module_path in registered:          # a balancer's file: its registered class is its public object
        b = registered[module_path]
        return [f"{module_path}.{b['class']}"]
    exports = _static_exports(module)
    names = set(exports or [])
    objects = set()
    if module_path == "keras_dbmtl.balancers":   # __all__ = [static names] + the registered classes
        objects = {f"keras_dbmtl.balancers.{b['module']}.{b['class']}" for b in balancers()}
    elif not exports:
        names = {n for n, m in module.members.items()
                 if not n.startswith("_") and not m.is_alias and (m.is_class or m.is_function)}
    for name in names:
        path = canonical(module, name)
        if path is None:
            continue
        target = _resolve(path)
        if target is not None and (target.is_class or target.is_function):
            objects.add(path)
    return sorted(objects)


def _resolve(path):
    obj = package()
    for part in path.split(".")[1:]:
        member = obj.members.get(part)
        if member is None:
            return None
        if member.is_alias:
            return _resolve(member.target_path) if member.target_path.startswith("keras_dbmtl") else None
        obj = member
    return obj


def missing_docstrings():
    """Public modules and objects without a docstring (after the listed exemptions)."""
    missing = []
    for module_path in public_modules():
        if _exempt(module_path):
            continue
        if not _module(module_path).docstring:
            missing.append(module_path)
        for path in public_objects(module_path):
            obj = _resolve(path)
            if obj is None or _exempt(path) or (obj.is_function and obj.name in ENTRY_POINTS):
                continue
            if not obj.docstring:
                missing.append(path)
    return sorted(set(missing))


def _exempt(path):
    return any(path == p or path.startswith(p + ".") for p in UNDOCUMENTED_OK)


# --------------------------------------------------------------------------------------------------- balancers

def _literal(node, constants):
    if isinstance(node, ast.JoinedStr):   # f"int [0, {warmup_epochs})": shown with the argument's name
        return "".join(v.value if isinstance(v, ast.Constant) else ast.unparse(v.value) for v in node.values)
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    try:
        allowed = {"str": str, "int": int, "float": float, "bool": bool, "tuple": tuple}
        return eval(compile(ast.Expression(node), "<range>", "eval"), {"__builtins__": {}}, {**allowed, **constants})
    except Exception:  # noqa: BLE001 - an expression we cannot evaluate statically: shown as written
        return ast.unparse(node)


def _describe_range(allowed):
    alternatives = allowed if isinstance(allowed, tuple) else (allowed,)
    parts = []
    for a in alternatives:
        if isinstance(a, type):
            parts.append(f"any {a.__name__}")
        elif isinstance(a, str) and re.match(r"^(int )?[\[(].*[\])]$", a):
            parts.append(a.replace("inf", "∞"))
        else:
            parts.append(f"`{a!r}`")
    return " or ".join(parts)


@functools.lru_cache(maxsize=None)
def _files():
    parsed = {}
    for path in sorted(BALANCERS.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    constants[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
        parsed[path.stem] = (tree, constants)
    return parsed


def _classes():
    """class name -> (module stem, ClassDef, constants)."""
    classes = {}
    for stem, (tree, constants) in _files().items():
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = (stem, node, constants)
    return classes


def _lineage(name):
    classes = _classes()
    chain = []
    while name in classes:
        chain.append(name)
        node = classes[name][1]
        bases = [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]
        name = bases[0] if bases else None
    return chain


def _method(node, name):
    return next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def _checks(function, constants):
    ranges = {}
    for call in ast.walk(function):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "check_hyperparameters":
            for keyword in call.keywords:
                if isinstance(keyword.value, ast.Tuple) and len(keyword.value.elts) == 2:
                    ranges[keyword.arg] = _describe_range(_literal(keyword.value.elts[1], constants))
    return ranges


def _signature(function):
    args = function.args
    positional = args.args[1:]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = [(a.arg, None if d is None else ast.unparse(d)) for a, d in zip(positional, defaults)]
    out += [(a.arg, None if d is None else ast.unparse(d)) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return out


def _shape_text(node, function):
    if isinstance(node, ast.Name) and function is not None:
        for n in ast.walk(function):
            if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == node.id for t in n.targets):
                node = n.value
                break
    text = ast.unparse(node)
    text = text.replace("num_shared_parameters", "P").replace("num_tasks", "T")
    if isinstance(node, ast.Tuple):
        dims = [ast.unparse(e).replace("num_shared_parameters", "P").replace("num_tasks", "T") for e in node.elts]
        return " × ".join(dims) if dims else "scalar"
    return text


def _state(chain):
    classes = _classes()
    state = []
    for name in chain:
        if name == "Balancer":             # its step counter, `iterations`, is every balancer's
            continue
        _, node, _ = classes[name]
        build = _method(node, "build")
        if build is None:
            continue
        for call in ast.walk(build):
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
                continue
            if call.func.attr == "state_variable" and len(call.args) >= 2:
                state.append((_literal(call.args[1], {}), _shape_text(call.args[0], build), "state"))
            elif call.func.attr == "add_weight":
                kw = {k.arg: k.value for k in call.keywords}
                learned = "trainable" in kw and ast.unparse(kw["trainable"]) == "True"
                if "name" in kw and "shape" in kw:
                    state.append((_literal(kw["name"], {}), _shape_text(kw["shape"], build),
                                  "learned" if learned else "state"))
        if any(isinstance(c, ast.Call) and ast.unparse(c.func).endswith("SeedGenerator") for c in ast.walk(node)):
            state.append(("seed generator", "random stream", "state"))
    return state


def _citation(docstring):
    first = docstring.strip().split("\n\n")[0].replace("\n", " ")
    if not re.search(r"et al\.|\b(19|20)\d\d\b", first):
        return None, None
    title = re.search(r'"([^"]+)"', first)
    query = title.group(1) if title else re.sub(r",?\s*Algorithm \d+", "", first)
    url = "https://scholar.google.com/scholar?q=" + urllib.parse.quote_plus(query)
    return first, url


def _tests_naming(name, class_name, limit=3):
    """For a balancer without tests/balancers/test_<module>.py: the test files that name it most."""
    pattern = re.compile(rf'["\']{re.escape(name)}["\']|\b{re.escape(class_name)}\(')
    counts = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        n = len(pattern.findall(path.read_text(encoding="utf-8")))
        if n:
            counts.append((-n, path.relative_to(ROOT).as_posix()))
    return [p for _, p in sorted(counts)[:limit]]


@functools.lru_cache(maxsize=None)
def balancers():
    """Every registered balancer, sorted by name: dicts with name, class, module, kind, parameters, state, ..."""
    classes = _classes()
    found = []
    base_ranges = _checks(_method(classes["Balancer"][1], "__init__"), classes["Balancer"][2])
    for stem, (tree, constants) in _files().items():
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            names = [d.args[0].value for d in node.decorator_list
                     if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register" and d.args]
            if not names:
                continue
            chain = _lineage(node.name)
            kind = next((KINDS[c] for c in chain if c in KINDS), None)
            ranges = dict(base_ranges)
            init = None
            for name in chain:
                function = _method(classes[name][1], "__init__")
                if function is not None:
                    init = init or function
                    ranges = {**_checks(function, classes[name][2]), **ranges} if name != node.name else ranges
            own = _method(node, "__init__")
            if own is not None:
                ranges.update(_checks(own, constants))
            parameters = [(p, d, ranges.get(p)) for p, d in (_signature(init) if init else [])]
            docstring = ast.get_docstring(tree) or ""
            citation, url = _citation(docstring)
            test = ROOT / "tests" / "balancers" / f"test_{stem}.py"
            tests = [f"tests/balancers/test_{stem}.py"] if test.exists() else _tests_naming(names[0], node.name)
            found.append({
                "name": names[0], "class": node.name, "module": stem, "kind": kind, "chain": chain,
                "summary": (ast.get_docstring(node) or "").strip().split("\n\n")[0].replace("\n", " "),
                "title": docstring.strip().split("\n")[0], "citation": citation, "paper_url": url,
                "parameters": parameters, "state": _state(chain),
                "tests": tests,
            })
    return sorted(found, key=lambda b: b["name"])
