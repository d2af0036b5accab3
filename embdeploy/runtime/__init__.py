"""The runtime a production service imports: `Session` over an export directory, and `serve` over HTTP.

    from embdeploy.runtime import Session
    from embdeploy.runtime.serve import create_app, serve   # needs `embdeploy[serve]`
"""

from ..ort import PROVIDER_ALIASES, resolve_providers
from .session import Session, check_ids, open_session

__all__ = ["PROVIDER_ALIASES", "Session", "check_ids", "open_session", "resolve_providers"]
