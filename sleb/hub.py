"""Reaching the Hugging Face hub through huggingface_hub's own session, or knowing at once that it can't be.

huggingface_hub retries a failed connection five times with back-off (about 25 s) before transformers
or datasets give up and fall back to the local cache. So before the first hub download of a run, one
request goes out through the library's own HTTP session (its proxies, `HF_ENDPOINT`, certificates)
with a short timeout. If the hub answers at all, the libraries download as usual and report their own
errors (unknown id, gated model); if it can't be reached, they are switched to their offline mode, so a
cached copy still loads and a missing one fails at once. `HF_HUB_OFFLINE=1` skips the request, and a
local directory or file never gets here.
"""

import os
import sys

# Seconds for the one request; HF_HUB_ETAG_TIMEOUT (the library's own setting) overrides it.
REQUEST_TIMEOUT = 10
_reachable = []  # the answer, once asked


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # The libraries read these variables at import; set the copies of the ones already imported.
    sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True
        sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True


def reach() -> bool:
    """Before a hub download: True if the hub answers; else the libraries go offline (cache only)."""
    if offline():
        return False
    if not _reachable:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        timeout = constants.HF_HUB_ETAG_TIMEOUT if "HF_HUB_ETAG_TIMEOUT" in os.environ else REQUEST_TIMEOUT
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)  # any HTTP answer means reachable
            _reachable.append(True)
        except Exception:  # DNS, refused, proxy, TLS or timeout: the libraries' own transport errors
            _reachable.append(False)
            _go_offline()
    return _reachable[0]
