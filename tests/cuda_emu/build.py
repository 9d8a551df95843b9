"""Builds a test harness around a fastloss .cu file for the CUDA emulator (emu.h): the file's
kernel launches ``k<<<grid, block, smem, stream>>>(args)`` are rewritten as
``emu::launch(k, {grid, block, smem, stream}, args)``, each ``__shared__`` declaration is
followed by its registration (poisoned at each block's start) and each kernel with
``__launch_bounds__`` checks its block against it; the result compiles with the host C++
compiler into a shared library that the tests load with ctypes. Cached by content."""

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


_SHARED = re.compile(r"((?:^|\{)[ \t]*__shared__\s+([^;]*);)", re.M)
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def _split_top(text: str) -> list[str]:
    """`text` split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += c in "([{<"
        depth -= c in ")]}>"
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def register_shared(source: str) -> str:
    """Each `__shared__ T a[n], b;` (in a function, at the start of a line or after a `{`)
    followed on the same line by `::emu::shared_vars(a, b);`, which poisons them at each block's
    start (emu.h). One it cannot read is an error, not a variable left unpoisoned."""
    def names(m):
        out = []
        for declarator in _split_top(m[2]):
            name = re.search(r"([A-Za-z_]\w*)\s*$", declarator.split("[")[0])
            if name is None:
                raise RuntimeError(f"emulator build: cannot read the names of {m[1].strip()!r}")
            out.append(name[1])
        return f"{m[1]} ::emu::shared_vars({', '.join(out)});"
    out, count = _SHARED.subn(names, source)
    if count != len(re.findall(r"\b__shared__\b", _COMMENT.sub("", source))):
        raise RuntimeError("emulator build: a __shared__ declaration that build.py cannot register")
    return out


def _close(text: str, i: int) -> int:
    """The index of the bracket closing the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        depth += text[j] == "("
        depth -= text[j] == ")"
        if depth == 0:
            return j
    raise RuntimeError("emulator build: unbalanced parentheses")


def check_launch_bounds(source: str) -> str:
    """A kernel `__global__ void __launch_bounds__(b...) k(params) {` starts with
    `::emu::launch_bounds(b...);` (emu.h erases the attribute; the block's size is checked
    against it in the kernel's own scope, where its constants and template arguments are)."""
    out, pos = [], 0
    for m in re.finditer(r"__global__\s+void\s+__launch_bounds__\s*\(", source):
        if m.start() < pos:
            continue
        args_end = _close(source, m.end() - 1)
        params = source.index("(", args_end + 1)
        body = _close(source, params) + 1
        while body < len(source) and source[body].isspace():
            body += 1
        if source.startswith("{", body):  # a definition, not a declaration
            out.append(source[pos:body + 1] + f" ::emu::launch_bounds({source[m.end():args_end]});")
            pos = body + 1
    return "".join(out) + source[pos:]


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
    key.update((HERE / "build.py").read_bytes())
    for dep in sorted((CSRC / "common").iterdir()) + sorted((CSRC / Path(cu_file).parent).iterdir()):
        if dep.is_file():
            key.update(dep.read_bytes())
    out_dir = Path(tempfile.gettempdir()) / f"fastloss_emu_{name}_{key.hexdigest()[:16]}"
    lib = out_dir / f"{name}.so"
    if not lib.exists():
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler for the CUDA emulator")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "kernels.inc").write_text(f'#line 1 "{CSRC / cu_file}"\n' +
                                            check_launch_bounds(register_shared(rewrite_launches(cu))))
        tmp = out_dir / f"{name}.{os.getpid()}.so"
        cmd = [cxx, "-std=c++20", "-O1", "-g0", "-shared", "-fPIC", "-DFL_ISA=cuda_emu",
               f"-I{HERE / 'include'}", f"-I{CSRC}", f"-I{CSRC / Path(cu_file).parent}",
               f"-I{out_dir}", str(HERE / harness), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
        tmp.replace(lib)
    return ctypes.CDLL(str(lib))
