"""Container healthcheck: exit 0 when `GET /readyz` on this container's vbserve port
answers 200 (the model is loaded and the store answers), else 1. Standard library only,
so the image needs no curl."""

import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('VBSERVE_PORT', '8000')}/readyz"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:  # URLError, HTTPError (a 503) and timeouts are all OSErrors
    print(f"{url}: {exc}", file=sys.stderr)
    sys.exit(1)
