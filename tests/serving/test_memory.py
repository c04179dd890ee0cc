"""glibc's malloc as a worker sets it: bounded, without paying page faults for every picture."""

from __future__ import annotations

import subprocess
import sys

# In a process of its own: mallopt settings are for a whole process, before its threads start.
_FAULTS_PER_PICTURE = """
import resource
from PIL import Image
from image_classifier.serving import memory
assert memory.limit_malloc_arenas()
for _ in range(5):
    Image.new("RGB", (640, 480), (1, 2, 3))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    Image.new("RGB", (640, 480), (1, 2, 3))
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


def test_a_decoded_photo_reuses_freed_memory_instead_of_fresh_pages():
    # 1.2 MB of pixels (Pillow keeps RGB in 4 bytes): under a 1 MiB mmap threshold each one was
    # mapped and unmapped, 301 page faults a picture.
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_PICTURE], capture_output=True, text=True, check=True
    ).stdout
    assert float(out) < 10, out
