"""Peak extra memory of one call, measured in a fresh Python process (for the tests that check
an op never builds a large intermediate): `setup` runs first (imports, inputs, a warm-up call),
then the peak resident set size is restarted (writing 5 to /proc/self/clear_refs resets VmHWM)
and `call` runs; the result is VmHWM after it minus VmRSS before it, in bytes. Linux only."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

requires_proc = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                   reason="peak RSS from /proc (Linux)")

_MEASURE = """
import json as _json


def _kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])


open("/proc/self/clear_refs", "w").write("5")
_before = _kib("VmRSS:")
{call}
print(_json.dumps({{"extra": (_kib("VmHWM:") - _before) * 1024}}))
"""


def peak_extra_bytes(setup: str, call: str, *argv) -> int:
    """Bytes of peak memory `call` adds after `setup` (both Python source; `argv` reaches the
    script as sys.argv[1:])."""
    script = "import torch\ntorch.set_num_threads(1)\n" + textwrap.dedent(setup) + _MEASURE.format(call=call)
    out = subprocess.run([sys.executable, "-c", script, *map(str, argv)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra"]


def assert_never_builds(setup: str, calls: dict, intermediate_bytes: int, bound: int, what: str):
    """The eager call's peak shows the `what` (more than `intermediate_bytes`: the measurement
    can see it), and the fused call's stays under `bound`. `calls`: {"fused": ..., "eager": ...}."""
    eager = peak_extra_bytes(setup, calls["eager"])
    assert eager > intermediate_bytes, f"the measurement missed the eager {what}: {eager} B"
    fused = peak_extra_bytes(setup, calls["fused"])
    assert fused < bound, f"fused peak extra memory {fused} B > bound {bound} B"
