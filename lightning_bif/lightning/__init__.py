"""The Lightning integration: ``BIFCallback`` and what only it needs (the only layer importing Lightning)."""
