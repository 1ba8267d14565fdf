"""The HTTP server (FastAPI + uvicorn) and its web page; import ``ferkit.serve.app`` explicitly to use it."""
