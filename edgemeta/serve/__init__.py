"""Serving: ONNX Runtime only; never imports torch or edgemeta.meta (see DESIGN.md)."""
