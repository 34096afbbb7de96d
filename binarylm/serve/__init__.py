"""Serving a checkpoint over HTTP: an OpenAI-compatible API on the shared inference engine.

    binarylm serve --checkpoint runs/demo --port 8000
"""
