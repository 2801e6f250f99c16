#!/usr/bin/env python3
"""Install, into the running interpreter's site-packages, a startup hook that makes ``import timm``
and ``import torchvision`` work in this environment without importing the project first.

Why at the install level: the environment ``make`` builds pairs a CPU torch with PyPI's torchvision,
a CUDA build whose ``_C`` extension cannot load beside it; torchvision's import then dies with
``operator torchvision::nms does not exist``. The project's own code fixes that before it imports timm
(``agents/_torchvision_compat.py``), but a user's script or notebook in the same venv would not. The
hook is a ``.pth`` line that registers an import finder; it does nothing at start-up (torch is not
imported) and acts once, on the first ``import torchvision``, only if the extension cannot be loaded.

    python scripts/install_torchvision_hook.py            # into this interpreter's site-packages
    python scripts/install_torchvision_hook.py --remove
"""
from __future__ import annotations

import argparse
import os
import site
import sys
import sysconfig

MODULE = "munet_torchvision_hook"
COMPAT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "agents",
                      "_torchvision_compat.py")
# The hook is the project's own fix (one copy of the logic) plus a finder that runs it on the first
# ``import torchvision`` of any interpreter in this environment.
FINDER = '''

import importlib.abc as _abc
import sys as _sys


class _Finder(_abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        _sys.meta_path.remove(self)  # act once; the real import goes on after this returns
        ensure_torchvision_importable()
        return None


_sys.meta_path.insert(0, _Finder())
'''


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--remove", action="store_true")
    args = p.parse_args()
    target = sysconfig.get_paths()["purelib"] if sys.prefix != sys.base_prefix else site.getusersitepackages()
    mod, pth = os.path.join(target, MODULE + ".py"), os.path.join(target, MODULE + ".pth")
    if args.remove:
        for f in (mod, pth):
            if os.path.exists(f):
                os.remove(f)
        print(f"removed the torchvision import hook from {target}")
        return 0
    os.makedirs(target, exist_ok=True)
    with open(COMPAT) as src, open(mod, "w") as fh:
        fh.write("# Installed by munet-swarm scripts/install_torchvision_hook.py from "
                 "agents/_torchvision_compat.py\n" + src.read() + FINDER)
    with open(pth, "w") as fh:
        fh.write(f"import {MODULE}\n")
    print(f"installed the torchvision import hook in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
