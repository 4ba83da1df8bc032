"""chatnode: a WhatsApp-style 1:1 messaging backend."""

__version__ = "0.1.0"
