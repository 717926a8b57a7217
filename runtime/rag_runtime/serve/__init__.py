"""``rag-serve``: the HTTP service over a ``RagPipeline`` (needs ``pip install 'rag-export[serve]'``).

    from rag_runtime import RagPipeline
    from rag_runtime.serve import ServeLimits, create_app

    app = create_app(RagPipeline.load("out/"), ServeLimits(max_batch_size=8))   # any ASGI server runs it
"""

from .limits import ServeLimits

__all__ = ["ServeLimits", "create_app"]


def __getattr__(name: str):
    # Imported on first use so that `rag-serve` can name the missing extra instead of failing on import.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
