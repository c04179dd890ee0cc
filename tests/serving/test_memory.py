"""glibc's malloc as a worker sets it: bounded, without paying page faults for every picture;
the garbage collector's pauses measured without ever blocking the process."""

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


# prometheus_client's multiprocess values write under one lock per process; a collection can
# start inside that section (any allocation sets one off), and a hook that wrote a metric there
# waited on the lock its own thread held: three CI tests' servers stopped answering for good.
_COLLECTIONS_INSIDE_METRIC_WRITES = """
import asyncio, gc, os, sys, tempfile
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from image_classifier.serving import memory

async def main():
    memory.watch_garbage_collector(every_s=0.01)
    labelled = Histogram("test_labelled_seconds", "one series a label", ["n"])
    gc.set_threshold(1)  # a collection at almost every allocation, metric writes included
    for n in range(300):
        labelled.labels(str(n)).observe(0.1)
        junk = [[]]
        junk[0].append(junk)  # a cycle for the collector to free
    gc.set_threshold(700, 10, 10)
    await asyncio.sleep(0.1)  # the notes reach the metrics
    scraped = CollectorRegistry()
    MultiProcessCollector(scraped)  # as /metrics reads the workers' files
    def total(name):
        return sum(scraped.get_sample_value(name, {"generation": str(g)}) or 0 for g in range(3))
    print(total("image_classifier_gc_pause_seconds_count"),
          total("image_classifier_gc_collected_objects_total"))

asyncio.run(main())
"""


def test_collections_are_timed_and_a_collection_inside_a_metric_write_does_not_block():
    run = subprocess.run(
        [sys.executable, "-c", _COLLECTIONS_INSIDE_METRIC_WRITES],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    counted, freed = map(float, run.stdout.split())
    assert counted >= 300 and freed >= 300, run.stdout
