#!/usr/bin/env python3
"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which this project does not require).
Markdown cells are copied; code cells not flagged `#| hide` are shown with their markdown or text outputs.
`--check` only compares and exits 1 when README.md is stale."""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
HDR = '<!-- generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file -->\n\n'

def _flags(src):
    return {m.group(1) for m in re.finditer(r'^#\s*\|\s*([\w-]+)', src, re.M)}

def render(nb_path=root/'nbs'/'index.ipynb'):
    nb, parts = json.loads(Path(nb_path).read_text()), []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown': parts.append(src.strip()); continue
        fl = _flags(src)
        if 'hide' in fl or 'export' in fl or 'exporti' in fl: continue
        code = '\n'.join(l for l in src.split('\n') if not re.match(r'^#\s*\|', l)).strip()
        if code and 'hide_input' not in fl and 'echo: false' not in src: parts.append(f'```python\n{code}\n```')
        for o in c.get('outputs', []):
            d = o.get('data', {})
            if 'text/markdown' in d: parts.append(''.join(d['text/markdown']).strip())
            elif o.get('output_type') == 'stream': parts.append('```\n' + ''.join(o['text']).rstrip() + '\n```')
            elif 'text/plain' in d: parts.append('```\n' + ''.join(d['text/plain']).rstrip() + '\n```')
    return HDR + '\n\n'.join(p for p in parts if p) + '\n'

if __name__ == '__main__':
    txt, readme = render(), root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != txt:
            print('README.md is stale: run `python .ci/readme.py` after editing nbs/index.ipynb'); sys.exit(1)
        print('README.md is up to date')
    else: readme.write_text(txt); print(f'wrote {readme}')
