"""Shared test settings: hypothesis must not fail on a slow moment of a busy machine."""

from hypothesis import settings

settings.register_profile("chatnode", deadline=None)
settings.load_profile("chatnode")
