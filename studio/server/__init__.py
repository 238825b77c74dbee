"""`studio serve`: an OpenAI-compatible HTTP API (Starlette on uvicorn) in front of the engine.

Torch-free: every request becomes an engine job submitted through `studio.client.EngineClient`,
the same queue the window's and the CLI's jobs go through.
"""

from studio.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
