"""The environment `make` builds: a user's own script can import timm and torchvision directly."""
from __future__ import annotations

import os
import subprocess
import sys


def test_import_timm_in_a_fresh_interpreter_outside_the_project(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    code = ("import sys; assert 'agents' not in sys.modules\n"
            "import torchvision, timm\n"
            "m = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=3)\n"
            "assert 'agents' not in sys.modules  # the fix is the install-level hook, not the project\n"
            "print('ok', timm.__version__, torchvision.__version__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok ")
