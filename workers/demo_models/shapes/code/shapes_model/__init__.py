"""dreamq demo model: coloured shapes moving across a dark frame, from a text prompt.

Loaded by the worker from a downloaded bundle under a per-version module name, so everything
inside the package is imported relatively. Needs only torch, numpy and safetensors.
"""

from .model import GenerationCancelled, ShapesVideoModel
from .vocab import COLOURS, DIRECTIONS, SHAPES, TOKENS, parse_prompt

__all__ = ["COLOURS", "DIRECTIONS", "SHAPES", "TOKENS", "GenerationCancelled", "ShapesVideoModel", "parse_prompt"]
