"""The environment is the locked one: a machine that drifted from requirements/lock.txt (a
package upgraded by hand, a new release resolved by an unlocked install) shows up here, by
name, before it shows up as a strange failure elsewhere."""
import os.path as osp
import re
import sysconfig
from importlib.metadata import distributions

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
LOCK = osp.join(ROOT, 'requirements', 'lock.txt')
# Not installed by tools/install.sh: the virtualenv's own pip, and this project.
NOT_LOCKED = {'pip', 'mmseg-gate'}


def canonical(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def read_lock(path: str = LOCK) -> dict:
    pins = {}
    with open(path, encoding='utf-8') as f:
        for line in f:
            line = line.split('#')[0].strip()
            if line:
                name, _, version = line.partition('==')
                assert version, f'{path}: {line!r} is not an exact pin (name==version)'
                pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict:
    """What pip installed into this environment's site-packages (not the copies other
    packages vendor, e.g. setuptools' own, which it puts on sys.path when imported)."""
    paths = sorted({sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']})
    return {canonical(d.metadata['Name']): d.version for d in distributions(path=paths)}


def drift(pins: dict, have: dict) -> list:
    """Human-readable differences, one per package (a local label such as +cpu differs too:
    torchvision does not import beside torch's +cpu build)."""
    problems = []
    for name, version in sorted(pins.items()):
        if name not in have:
            problems.append(f'{name}: locked {version}, not installed')
        elif have[name] != version:
            problems.append(f'{name}: locked {version}, installed {have[name]}')
    problems += [f'{name}: installed {have[name]}, not in the lock'
                 for name in sorted(set(have) - set(pins) - NOT_LOCKED)]
    return problems


def test_the_environment_is_the_lock():
    problems = drift(read_lock(), installed())
    assert not problems, (
        'This environment differs from requirements/lock.txt:\n  ' + '\n  '.join(problems)
        + '\nReinstall from the lock (bash tools/install.sh), or refresh the lock '
        '(docs/installation.md, "Refreshing the lock").')


def test_drift_is_named():
    pins = {'transformers': '5.23.0', 'torch': '2.13.0'}
    assert drift(pins, {'transformers': '5.23.0', 'torch': '2.13.0'}) == []
    assert drift(pins, {'transformers': '5.23.0', 'torch': '2.13.0+cpu'}) == [
        'torch: locked 2.13.0, installed 2.13.0+cpu']
    assert drift(pins, {'transformers': '5.24.0', 'torch': '2.13.0', 'extra': '1.0'}) == [
        'transformers: locked 5.23.0, installed 5.24.0', 'extra: installed 1.0, not in the lock']
    assert drift(pins, {'torch': '2.13.0'}) == ['transformers: locked 5.23.0, not installed']
