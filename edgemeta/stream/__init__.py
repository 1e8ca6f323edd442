"""Streams: ingest, labelled windows and drift detection; no torch."""
