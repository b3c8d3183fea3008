"""One module per chat platform; each owns the pydantic model of its app.yaml section."""

from adapters.settings import ENDPOINTS, SETTINGS_MODELS

__all__ = ["ENDPOINTS", "SETTINGS_MODELS"]
