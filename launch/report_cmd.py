"""`query.py report --out FILE.html`: the continual-development report (HTML page + JSON twin).

    python launch/query.py --store DIR report --out report.html    # also writes report.json

Wired into launch/query.py as one more ``(register_report, cmd_report)`` pair of ``SUBCOMMANDS``.
torch-free like query.py: the report reads only store records. Both files are written atomically
(temporary file in the same folder, then rename), so a reader never sees half a report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from launch.common import UserError
from store import open_store
from store.codec import json_safe
from report.build import build_report
from report.html import render_html

HTML_SUFFIXES = (".html", ".htm")


class ReportOutputError(UserError):
    """The --out path cannot take the report (a user error: exit 2, one line)."""


def output_paths(out: str) -> tuple[Path, Path]:
    """(html path, json path) for ``--out``; checks the folder before any store work is done."""
    html = Path(out).expanduser()
    if html.suffix.lower() == ".json":
        raise ReportOutputError(f"--out {out} ends in .json: give the .html path, the JSON file "
                                f"is written beside it")
    if html.is_dir():
        raise ReportOutputError(f"--out {out} is a directory: give a file name such as "
                                f"{html / 'report.html'}")
    folder = html.parent if str(html.parent) else Path(".")
    if not folder.is_dir():
        raise ReportOutputError(f"--out folder {folder} does not exist: create it or choose "
                                f"another path")
    if not os.access(folder, os.W_OK):
        raise ReportOutputError(f"--out folder {folder} is not writable: choose another path")
    stem = html.with_suffix("") if html.suffix.lower() in HTML_SUFFIXES else html
    return html, stem.with_name(stem.name + ".json")




def _write_atomic(path: Path, text: str) -> None:
    """Write beside the target, then rename over it (the file gets the umask's usual mode)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(store_path: str | os.PathLike, out: str,
                 keys: str | None = None) -> tuple[Path, Path, dict]:
    """Build the report of the store at ``store_path``; write FILE.html and FILE.json."""
    html_path, json_path = output_paths(out)
    st = open_store(os.fspath(store_path), readonly=True, keys=keys)
    try:
        report = build_report(st)
    finally:
        st.close()
    try:
        _write_atomic(json_path, json.dumps(json_safe(report), indent=1, allow_nan=False))
        _write_atomic(html_path, render_html(report))
    except OSError as exc:
        raise ReportOutputError(f"cannot write the report to {html_path.parent}: "
                                f"{exc.strerror or exc}") from None
    return html_path, json_path, report


def register_report(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="continual-development report: FILE.html + FILE.json")
    p.add_argument("--out", required=True, metavar="FILE.html",
                   help="HTML page to write; the same numbers go to FILE.json beside it")
    return p


def cmd_report(args: argparse.Namespace) -> int:
    html_path, json_path, report = write_report(args.store, args.out, keys=args.keys)
    s = report["summary"]
    print(f"report: {html_path} and {json_path} ({s['tasks']} tasks, {s['trials']} trained "
          f"children, {s['presets']} presets)")
    return 0
