"""Model catalog, pull, verify, quantize, memory plan and serving."""
