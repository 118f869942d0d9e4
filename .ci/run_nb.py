#!/usr/bin/env python
"""Run notebooks top to bottom and keep their outputs, cleaned for the web (the notebooks are the documentation).

    python .ci/run_nb.py nbs/08_models.ipynb [more.ipynb ...] [--slow]

Cells flagged `#| slow` are skipped unless --slow, and keep the outputs they had. Kept: text, tables, figures.
Dropped: progress bars (fastprogress HTML), stderr (warnings, compile messages), execution counts. Local paths
(this checkout, the temporary folder, the home folder) are replaced by short placeholders. Then `nbdev_clean` runs
on each file, so the result is what CI's clean check expects. Exits non-zero if a cell fails (the file is untouched).
"""
import os, re, sys, tempfile
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory

ROOT = Path(__file__).resolve().parent.parent

def _directives(cell):
    return {m.group(1).rstrip(':').lower() for m in re.finditer(r'^#\|\s*([\w:-]+)', cell.get('source', ''), re.M)}

def _clean_text(s:str) -> str:
    for p, r in ((str(ROOT), '.'), (str(ROOT.parent/'shared'), '../shared'), (tempfile.gettempdir(), '/tmp'),
                 (str(Path.home()), '~')):
        s = s.replace(p, r)
    return s

_BAR = re.compile(r'^\s*(\|█*[ ]*\|\s*)?\d+(\.\d+)?% \[\d+/\d+.*$|^\s*\[?\d+/\d+ [\d:]+<[\d:]*.*$', re.M)

def _keep(o) -> bool:
    if o.get('output_type') == 'stream' and o.get('name') == 'stderr': return False
    if o.get('output_type') == 'execute_result' and ''.join(o.get('data', {}).get('text/plain', '')).startswith('<function '): return False
    html = ''.join(o.get('data', {}).get('text/html', '')) if 'data' in o else ''
    return '<progress' not in html and 'progress-bar' not in html

def _clean_output(o):
    if o.get('output_type') == 'stream': o['text'] = _BAR.sub('', _clean_text(''.join(o['text']))).replace('\n\n\n', '\n')
    for k, v in list(o.get('data', {}).items()):
        if k.startswith('text/') or k == 'application/json': o['data'][k] = _clean_text(''.join(v) if isinstance(v, list) else v)
    o.pop('execution_count', None)
    return o

def run(fn:Path, slow:bool=False) -> bool:
    nb = read_nb(fn)
    skip = lambda c: c.cell_type != 'code' or ('slow' in _directives(c) and not slow) or 'nbdev_export(' in c.source
    old = {id(c): c.get('outputs', []) for c in nb.cells}
    for c in nb.cells:   # a cell that runs starts from no output (execnb keeps the old ones when a cell prints nothing)
        if c.cell_type == 'code' and not skip(c): c['outputs'] = []
    os.environ['IN_TEST'] = '1'
    sh = CaptureShell(fn)
    with working_directory(fn.parent):
        try: sh.run_all(nb, exc_stop=True, preproc=skip)
        except Exception:
            sys.stderr.write(sh.prettytb(fname=fn) + '\n'); return False
    for c in nb.cells:
        if c.cell_type != 'code': continue
        if skip(c): c['outputs'] = old.get(id(c), [])
        c['outputs'] = [_clean_output(o) for o in c.get('outputs', []) if _keep(o)]
        c['execution_count'] = None
    write_nb(nb, fn)
    return True

if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    slow = '--slow' in sys.argv
    if not args: sys.exit(__doc__)
    ok = True
    for a in args:
        fn = Path(a).resolve()
        good = run(fn, slow)
        print(f"{'ran' if good else 'FAILED'} {a}", flush=True)
        ok &= good
    if ok:
        from nbdev.clean import nbdev_clean
        for a in args: nbdev_clean(fname=a)
    sys.exit(0 if ok else 1)
