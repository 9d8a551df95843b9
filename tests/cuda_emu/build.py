"""Builds a test harness around a fastloss .cu file for the CUDA emulator (emu.h): the file's
kernel launches ``k<<<grid, block, smem, stream>>>(args)`` are rewritten as
``emu::launch(k, {grid, block, smem, stream}, args)``, and the result compiles with the host
C++ compiler into a shared library that the tests load with ctypes. Cached by content."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
_LAUNCH = re.compile(r"(\b[A-Za-z_][\w:]*(?:<[^;{}()]*?>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def rewrite_launches(source: str) -> str:
    return _LAUNCH.sub(lambda m: f"::emu::launch({m[1]}, {{{m[2]}}}, ", source)


def compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+\.cuh)"[^\n]*$', re.M)


def inline_local_headers(source: str, folder: Path) -> str:
    """`#include "x.cuh"` of a file in `folder` replaced by its text, so that its launches are
    rewritten too (once: such a header is part of one .cu file)."""
    def text(m):
        path = folder / m[1]
        return f'#line 1 "{path}"\n' + path.read_text() + "\n" if path.exists() else m[0]
    return _LOCAL_INCLUDE.sub(text, source)


def build(cu_file: str, harness: str, name: str) -> ctypes.CDLL:
    """The shared library of `harness` (a .cpp in this folder that includes "kernels.inc", the
    rewritten `cu_file`, relative to csrc/)."""
    cu = inline_local_headers((CSRC / cu_file).read_text(), (CSRC / cu_file).parent)
    files = [HERE / harness, HERE / "emu.h", *sorted((HERE / "include").iterdir())]
    key = hashlib.sha256(cu.encode() + b"".join(f.read_bytes() for f in files))
    for dep in sorted((CSRC / "common").iterdir()) + sorted((CSRC / Path(cu_file).parent).iterdir()):
        key.update(dep.read_bytes())
    out_dir = Path(tempfile.gettempdir()) / f"fastloss_emu_{name}_{key.hexdigest()[:16]}"
    lib = out_dir / f"{name}.so"
    if not lib.exists():
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler for the CUDA emulator")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "kernels.inc").write_text(f'#line 1 "{CSRC / cu_file}"\n' + rewrite_launches(cu))
        tmp = out_dir / f"{name}.{os.getpid()}.so"
        cmd = [cxx, "-std=c++20", "-O1", "-g0", "-shared", "-fPIC", "-DFL_ISA=cuda_emu",
               f"-I{HERE / 'include'}", f"-I{CSRC}", f"-I{CSRC / Path(cu_file).parent}",
               f"-I{out_dir}", str(HERE / harness), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
        tmp.replace(lib)
    return ctypes.CDLL(str(lib))
