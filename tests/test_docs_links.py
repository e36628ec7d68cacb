"""Every relative link in README.md and docs/*.md points to a file that exists and, when it
has a #anchor, to a heading of that file.

Plain text reading only: no import of the package, no network. Anchors follow GitHub's rule
for heading ids (lowercase; punctuation other than hyphens and underscores removed; each
space a hyphen; a repeated heading gets -1, -2, ...).
"""
import glob
import os.path as osp
import re
from urllib.parse import unquote

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FILES = ['README.md'] + sorted(
    osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'docs', '*.md')))

FENCE = re.compile(r'^(```|~~~).*?^\1[^\n]*$', re.M | re.S)
CODE_SPAN = re.compile(r'(`+)(?:(?!\1).)+?\1', re.S)
# [text](target) and ![alt](target); the text may hold one level of brackets and line
# breaks, the target may be followed by a "title".
LINK = re.compile(r'!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^()\s<>]*)>?(?:\s+"[^"]*")?\s*\)')
HEADING = re.compile(r'^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$', re.M)
EXTERNAL = ('http://', 'https://', 'mailto:')


def without_code(text):
    """The text with fenced blocks and code spans blanked (line breaks kept)."""
    blank = lambda m: re.sub(r'[^\n]', ' ', m.group(0))  # noqa: E731
    return CODE_SPAN.sub(blank, FENCE.sub(blank, text))


def slug(heading):
    """GitHub's id for a heading's text."""
    text = re.sub(r'!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)', r'\1', heading)  # link text
    text = re.sub(r'<[^>]+>', '', text).strip().lower()                        # inline HTML
    text = re.sub(r'[^\w\- ]', '', text)      # \w keeps letters, digits and underscores
    return text.replace(' ', '-')


def anchors(path):
    text = open(path, encoding='utf-8').read()
    seen, out = {}, set()
    for match in HEADING.finditer(FENCE.sub('', text)):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f'{base}-{n}')
    return out


def links(path):
    """(line number, link as written, target) for every link of the file."""
    text = without_code(open(path, encoding='utf-8').read())
    for match in LINK.finditer(text):
        line = text.count('\n', 0, match.start()) + 1
        yield line, match.group(0).replace('\n', ' '), match.group(2)


def broken(name):
    """One message per broken relative link of ROOT/name."""
    path = osp.join(ROOT, name)
    problems = []
    for line, written, target in links(path):
        if not target or target.lower().startswith(EXTERNAL):
            continue
        file_part, _, anchor = target.partition('#')
        dest = osp.normpath(osp.join(osp.dirname(path), unquote(file_part))) if file_part \
            else path
        where = f'{name}:{line}: {written}'
        if not osp.exists(dest):
            problems.append(f'{where}: no file {osp.relpath(dest, ROOT)}')
            continue
        if not anchor:
            continue
        if not dest.endswith('.md'):
            problems.append(f'{where}: #{anchor} points into {osp.relpath(dest, ROOT)}, '
                            'which is not markdown')
        elif unquote(anchor) not in anchors(dest):
            problems.append(f'{where}: no heading in {osp.relpath(dest, ROOT)} '
                            f'gives the anchor #{anchor}')
    return problems


def test_slug_rule():
    assert slug('Semantic correspondence: SPair-71k, PCK@0.1') == \
        'semantic-correspondence-spair-71k-pck01'
    assert slug("Standard segmentation: what differs from the authors' run") == \
        'standard-segmentation-what-differs-from-the-authors-run'
    assert slug('Checkpoints: safe, complete, exact, atomic') == \
        'checkpoints-safe-complete-exact-atomic'
    assert slug('Train, test, submit') == 'train-test-submit'
    assert slug('The `GATEBackbone` [arguments](x.md)') == 'the-gatebackbone-arguments'


def test_links_are_found():
    found = {name: list(links(osp.join(ROOT, name))) for name in FILES}
    assert any(target.startswith('docs/') for _, _, target in found['README.md']), \
        'README.md links no docs page: the link reader is broken'
    assert not any('`' in written for name in FILES for _, written, _ in found[name])


def test_broken_link_is_reported(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text('# A page: here\n\n[ok](#a-page-here) [gone](missing.md) '
                    '[bad anchor](#nowhere)\n```\n[in code](also-missing.md)\n```\n')
    global ROOT
    saved, ROOT = ROOT, str(tmp_path)
    try:
        problems = broken('page.md')
    finally:
        ROOT = saved
    assert len(problems) == 2, problems
    assert 'no file missing.md' in problems[0]
    assert 'gives the anchor #nowhere' in problems[1]


@pytest.mark.parametrize('name', FILES)
def test_relative_links_resolve(name):
    problems = broken(name)
    assert not problems, f'{len(problems)} broken link(s):\n' + '\n'.join(problems)
