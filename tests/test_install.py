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


def _munet_swarm() -> str:
    script = os.path.join(os.path.dirname(sys.executable), "munet-swarm")
    assert os.access(script, os.X_OK), "the install put no munet-swarm command beside python"
    return script


def test_the_console_command_is_each_launch_script(tmp_path):
    """`munet-swarm run|attach|query|serve|make-root` behave as the launch/ scripts: same help, same
    output, same errors and exit codes."""
    from helpers import REPO

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = _munet_swarm()

    def both(script: str, command: str, *args: str):
        a = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
        b = subprocess.run([cmd, command, *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        return a, b

    for script, command in (("run_swarm.py", "run"), ("attach.py", "attach"), ("query.py", "query"),
                            ("serve_store.py", "serve"), ("make_root.py", "make-root"),
                            ("serve_models.py", "serve-models")):
        a, b = both(script, command, "--help")
        assert a.returncode == b.returncode == 0 and a.stdout == b.stdout, command
    a, b = both("attach.py", "attach", "--store", str(tmp_path / "nothing"), "--task", "uci_digits")
    assert a.returncode == b.returncode == 2 and a.stderr == b.stderr and len(b.stderr.splitlines()) == 1
    store = str(tmp_path / "store")
    r = subprocess.run([cmd, "run", "--store", store, "--tasks", "uci_digits", "--preset", "test",
                        "--cycles", "1", "--refresh", "0.5"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = both("query.py", "query", "--store", store, "leaderboard", "--json")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and '"uci_digits"' in b.stdout
    r = subprocess.run([cmd, "nonsense"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1


def test_an_install_is_quiet(tmp_path):
    """`make install`'s pip line prints nothing on a healthy install (only real problems would show)."""
    from helpers import REPO

    env = dict(os.environ, PYTHONWARNINGS="ignore:Editable installation")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "-c", "constraints.txt", "-e", "."], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stderr[-2000:]
