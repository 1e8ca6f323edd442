"""Learning to learn: torch only, no files watched, no daemon (see docs/design.md)."""
