"""rag_runtime: answer questions from a rag-export directory with onnxruntime, faiss and numpy.

    from rag_runtime import RagPipeline
    pipe = RagPipeline.load("out/")
    result = pipe.generate(["who wrote hamlet?"], num_beams=4, max_length=40)[0]
    print(result.answers[0].text, [d.title for d in result.docs])
"""

from .artifact import Manifest
from .errors import (
    ArtifactError,
    IndexUnavailableError,
    InvalidOptionError,
    MissingDependencyError,
    RagError,
    UnknownOptionError,
)
from .options import GenerationOptions
from .pipeline import RagPipeline
from .results import Answer, Document, RagOutput
from .timing import StageTimer

__all__ = [
    "Answer",
    "ArtifactError",
    "Document",
    "GenerationOptions",
    "IndexUnavailableError",
    "InvalidOptionError",
    "Manifest",
    "MissingDependencyError",
    "RagError",
    "RagOutput",
    "RagPipeline",
    "StageTimer",
    "UnknownOptionError",
]

__version__ = "0.1.0"
