"""The package's layers, read from its imports: each module imports only its own layer and the
layers below it, source families never import each other, no two files import each other
(directly or round a loop), and no module calls a private function of the libraries it
builds on. The README's map ("How it is built") draws the same order."""
import ast
import os
import os.path as osp
import re
from typing import Dict, List, Tuple

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PACKAGE = 'mmseg_gate'

# Lowest first. A module belongs to the layer of its longest matching prefix.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ('base', ('fileio', 'engine')),
    ('data', ('datasets', 'evaluation')),
    ('shared by the sources', ('sources.base', 'sources.common')),
    ('sources', ('sources', 'sources.stable_diffusion', 'sources.adm', 'sources.dinov2',
                 'sources.dit', 'sources.composite')),
    ('store', ('store', )),
    ('models', ('models', )),
    ('tasks', ('protocols', 'analysis', 'benchmark', 'captioning')),
    ('tests and demos only', ('testing', )),
]
# Each source family is on its own: what two of them share lives in sources/common.
FAMILIES = ('sources.stable_diffusion', 'sources.adm', 'sources.dinov2', 'sources.dit',
            'sources.composite')


def package_modules() -> Dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for folder, _, files in os.walk(osp.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith('.py'):
                path = osp.join(folder, name)
                dotted = osp.relpath(path, ROOT)[:-3].replace(os.sep, '.')
                modules[dotted[:-len('.__init__')] if dotted.endswith('.__init__')
                        else dotted] = path
    return modules


def imports_of(module: str, path: str, modules: Dict[str, str]) -> List[Tuple[str, int]]:
    """(imported package module, line) for every import in the file, functions included."""
    package = module.split('.') if path.endswith('__init__.py') else module.split('.')[:-1]
    found = []
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read(), path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            if target == PACKAGE or target.startswith(PACKAGE + '.'):
                for alias in node.names:
                    child = f'{target}.{alias.name}'
                    found.append((child if child in modules else target, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names
                      if a.name == PACKAGE or a.name.startswith(PACKAGE + '.')]
    return found


def layer_of(module: str) -> Tuple[int, str]:
    """(index, prefix) of the module's layer; the package itself is above every layer but
    the test-only one."""
    name = module[len(PACKAGE) + 1:]
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + '.'):
                if best is None or len(prefix) > len(best[1]):
                    best = (index, prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: place it in "
                             'LAYERS (and in the README map).')
    return best


def family_of(module: str):
    name = module[len(PACKAGE) + 1:]
    return next((f for f in FAMILIES if name == f or name.startswith(f + '.')), None)


def test_every_import_follows_the_layer_order():
    modules = package_modules()
    wrong = []
    for module, path in sorted(modules.items()):
        where = osp.relpath(path, ROOT)
        top = module == PACKAGE
        for target, line in imports_of(module, path, modules):
            if target == PACKAGE:
                continue
            theirs = layer_of(target)
            if top:
                if LAYERS[theirs[0]][0] == 'tests and demos only':
                    wrong.append(f'{where}:{line} imports {target} (test-only code)')
                continue
            mine = layer_of(module)
            if theirs[0] > mine[0]:
                wrong.append(f'{where}:{line} imports {target}: layer '
                             f"'{LAYERS[theirs[0]][0]}' is above this module's "
                             f"'{LAYERS[mine[0]][0]}'")
            elif family_of(module) and family_of(target) and \
                    family_of(module) != family_of(target):
                wrong.append(f'{where}:{line} imports {target}: one source family imports '
                             'another (move what they share to sources/common)')
    assert not wrong, 'Imports against the layer order:\n' + '\n'.join(dict.fromkeys(wrong))


def test_no_import_loop_between_files():
    modules = package_modules()
    graph = {m: sorted({t for t, _ in imports_of(m, p, modules) if t != m})
             for m, p in modules.items()}
    state, loops = {}, []

    def visit(node, trail):
        state[node] = 'open'
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 'open':
                loops.append(' -> '.join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 'done'
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not loops, 'Import loops:\n' + '\n'.join(loops)


LIBRARIES = ('mmengine', 'diffusers', 'transformers', 'peft')
# Private names the project may use, each with its reason. Keep it empty if you can.
ALLOWED_PRIVATE: Dict[str, str] = {}


def test_no_private_names_of_the_libraries():
    """``from <library>... import _name`` and ``<library alias>._name`` uses are refused:
    private names change without notice between the locked versions and the next."""
    wrong = []
    for folder in (PACKAGE, 'tools'):
        for path in sorted(_python_files(osp.join(ROOT, folder))):
            tree = ast.parse(open(path, encoding='utf-8').read(), path)
            aliases = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and \
                        node.module.split('.')[0] in LIBRARIES:
                    for alias in node.names:
                        if alias.name.startswith('_') and not alias.name.startswith('__'):
                            wrong.append((path, node.lineno, f'{node.module}.{alias.name}'))
                        aliases[alias.asname or alias.name] = f'{node.module}.{alias.name}'
                    if any(part.startswith('_') for part in node.module.split('.')):
                        wrong.append((path, node.lineno, node.module))
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.split('.')[0] in LIBRARIES:
                            aliases[alias.asname or alias.name.split('.')[0]] = alias.name
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr.startswith('_') and \
                        not node.attr.startswith('__') and isinstance(node.value, ast.Name) \
                        and node.value.id in aliases:
                    wrong.append((path, node.lineno, f'{aliases[node.value.id]}.{node.attr}'))
    wrong = [(p, line, name) for p, line, name in wrong if name not in ALLOWED_PRIVATE]
    assert not wrong, 'Private names of ' + ', '.join(LIBRARIES) + ' in use:\n' + '\n'.join(
        f'{osp.relpath(p, ROOT)}:{line}: {name}' for p, line, name in wrong)


def _python_files(folder: str):
    for sub, _, files in os.walk(folder):
        yield from (osp.join(sub, f) for f in files if f.endswith('.py'))


def test_only_tests_and_tools_import_the_testing_package():
    """``mmseg_gate.testing`` builds random models and demo data: real code never needs it."""
    pattern = re.compile(r'^\s*(from|import)\s+(mmseg_gate\.testing|\.+testing)\b', re.M)
    wrong = [osp.relpath(p, ROOT) for p in _python_files(osp.join(ROOT, PACKAGE))
             if f'{os.sep}testing{os.sep}' not in p
             and pattern.search(open(p, encoding='utf-8').read())]
    wrong += [osp.relpath(p, ROOT) for p in _python_files(osp.join(ROOT, 'configs'))
              if pattern.search(open(p, encoding='utf-8').read())]
    assert not wrong, f'Real code imports mmseg_gate.testing: {wrong}'
