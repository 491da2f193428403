"""A one-node ONNX model (Identity, float[1]) for probing execution providers.

Embedded as bytes so the agent needs no ``onnx`` package; regenerate with
``onnx.helper`` (opset 13, IR 8) if it ever has to change.
"""
import base64

_MODEL = "CAgSCWVkZ2VmbGVldDo7ChAKAXgSAXkiCElkZW50aXR5EgVwcm9iZVoPCgF4EgoKCAgBEgQKAggBYg8KAXkSCgoICAESBAoCCAFCBAoAEA0="


def tiny_model_bytes() -> bytes:
    return base64.b64decode(_MODEL)
