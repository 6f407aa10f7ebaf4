"""glibc allocator settings (runtime.py): loading returns big buffers to the system; computing reuses them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# In a fresh interpreter: this process's heap already holds buffers freed by other tests, which glibc reuses
# before it looks at the mmap threshold at all.
PROBE = """
import ctypes, json, resource
from mistral7b.runtime import allocator_for_compute, tune_allocator

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

def faults(n=20, size=4 << 20):  # page faults of a buffer allocated, written and freed n times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

ok = tune_allocator()
loading = faults()
ok = allocator_for_compute() and ok
faults(1)  # the heap grows once
print(json.dumps({"glibc": ok, "loading": loading, "computing": faults(),
                  "pages": 20 * (4 << 20) // resource.getpagesize()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_compute_mode_reuses_step_buffers_instead_of_faulting_them_in_again():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not r["glibc"]:
        pytest.skip("not glibc")
    assert r["loading"] > r["pages"] // 2, r  # mmap: each buffer is faulted in page by page again
    assert r["computing"] < r["loading"] // 10, r  # heap: the same pages serve every step
