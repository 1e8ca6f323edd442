"""Serving: ONNX Runtime only; never imports torch or edgemeta.meta (see docs/design.md)."""
