"""lmpipe: the library behind the DVC stages in ``stages/``.

This package never downloads weights or data: every model is loaded from a local folder with
``local_files_only=True``. The offline flags below make that true for any library it calls as well;
they are set with ``setdefault`` so a user can still override them deliberately.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"
