"""Role agents and the multiplexer that shares one inference service between them."""
