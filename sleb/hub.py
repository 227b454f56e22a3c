"""Offline detection: with no route to the hub, use only the local cache instead of retrying for ~30 s."""

import functools
import os
import socket
import sys
from urllib.parse import urlparse

_TRUE = {"1", "ON", "YES", "TRUE"}


@functools.lru_cache(maxsize=1)
def use_cache_only_if_offline() -> bool:
    """Return True (and switch huggingface_hub and datasets to offline mode) when the hub is unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return False
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # The libraries read these variables at import; patch the copies of any already imported.
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True
        sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True
    return True
