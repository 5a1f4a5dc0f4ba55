"""Torch-free generation runtime over an attanchor-export artifact folder.

    from attanchor_runtime import Pipeline
    pipe = Pipeline.load("out/model-onnx")
    pipe.chat("What is in the image?", image="cat.jpg")
"""

from .errors import ArtifactError, NumericsError, RuntimeInputError
from .pipeline import FrontEnd, GenerateOutput, Pipeline, Stream

__all__ = ["ArtifactError", "FrontEnd", "GenerateOutput", "NumericsError", "Pipeline", "RuntimeInputError", "Stream"]
