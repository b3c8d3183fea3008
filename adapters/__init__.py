"""One module per chat platform; each owns the pydantic model of its app.yaml section."""

from adapters.settings import BUILT, ENDPOINTS, SETTINGS_MODELS

__all__ = ["BUILT", "ENDPOINTS", "SETTINGS_MODELS"]
