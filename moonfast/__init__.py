__version__ = "0.1.0"

import warnings as _warnings
# fastai 2.8.7 (pinned: see settings.ini) scripts a few layers with torch.jit.script at import, which torch 2.14 marks
# deprecated; the warning names nothing a moonfast user can act on, so it is not shown (only that one message, only there)
_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning, module=r'torch\.jit\._script')
