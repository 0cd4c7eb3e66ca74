__version__ = "0.1.0"


def __getattr__(name: str):
    # `from cm import Client` without making every `import cm` (the commands') pay for http.client
    if name in ("Client", "ApiError"):
        from cm.api import client

        return getattr(client, name)
    raise AttributeError(f"module 'cm' has no attribute {name!r}")
