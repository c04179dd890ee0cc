#!/bin/sh
# docker.setup_script: runs as root while the image is built. It readies BENTOML_HOME for a
# read-only root filesystem, and writes the HEALTHCHECK command
# (see Dockerfile.template): a real inference of a tiny built-in digit through POST /analyze on
# this container's own port, so "healthy" means the model answers, not merely that a port is open.
set -eu

# A read-only root filesystem (docker run --read-only, Kubernetes readOnlyRootFilesystem): BentoML
# creates these under $BENTOML_HOME at every start, so they must already exist. Its Prometheus
# multiprocess directory falls back to a fresh one under /tmp (a tmpfs / emptyDir) by itself.
mkdir -p "$BENTOML_HOME/bentos" "$BENTOML_HOME/models" "$BENTOML_HOME/envs" "$BENTOML_HOME/tmp"
chown bentoml:bentoml "$BENTOML_HOME/bentos" "$BENTOML_HOME/models" "$BENTOML_HOME/envs" \
    "$BENTOML_HOME/tmp"

cat > /usr/local/bin/bento-healthcheck <<'PYTHON'
#!/usr/bin/env python3
"""Exit 0 only if POST /analyze of a built-in 32x32 PNG of a "7" answers 200 with success."""

import base64
import json
import os
import sys
import urllib.request
import uuid

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAAAAABWESUoAAABhElEQVR42s3TXU+CUBgH8EcBIQjRiSHMKIdz86ZWba4"
    "uWl+6T9DW2rrI5WrWWpGK7y8IgoC8desQumvrXJ2L3/7Pztn/SYXw+0nDnwN0664/3N59WJBrNC7Oxd0E31JXbpoAIDzDsG"
    "MS9OH35yLMMWjG7LAVgUBSETBttuRRmj8gZ515plJmcTQC5q+PKsoc1uiXty7dX2axyAhXU7qIVK1VKXMPjLXjBRHgGAuNr13"
    "VS7iSh9D3/DACfMBoTqpXKaBwAM91owkId5bjjyl7ZSoGwMZy/AjAJULHmI08HjxNIeWadhRgggDaZNCV5bYKYBuWt/vVEPRaX"
    "0pfWYG5mAhODBg07ztLTQcwZiM1Dqh9uWs6AJBFg51nAgCQpSNnGOTLxZIglsgYwJ4g9PNMuj4tUHSOiQGU4GhjRLq8YRIatd"
    "GXDsFyHJNUuZXcHiLFAp5UOdDkdyvLsXhSad1lT9ZoUdhPAhutr5hZkSeTgLdW5zbJ5hNHBJ4NHkrgyDZI/YPd/AHR2KnapZAs3"
    "QAAAABJRU5ErkJggg=="
)


def main() -> int:
    port = os.environ.get("BENTOML_PORT") or os.environ.get("PORT") or "3000"
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"hc.png\"\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode() + PNG + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    tokens = [t.strip() for t in os.environ.get("API_TOKENS", "").split(",") if t.strip()]
    if tokens:
        headers["Authorization"] = f"Bearer {tokens[0]}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/analyze", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=4) as response:
            answer = json.load(response)
    except Exception as exc:  # any refusal, timeout or non-2xx status is unhealthy
        print(f"unhealthy: {exc}")
        return 1
    if answer.get("success") is not True:
        print(f"unhealthy: {answer}")
        return 1
    prediction = answer["prediction"]
    print(f"healthy: label={prediction['label']} confidence={prediction['confidence']:.3f}")
    return 0


sys.exit(main())
PYTHON
chmod 0755 /usr/local/bin/bento-healthcheck
