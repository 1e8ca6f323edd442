"""Learning to learn: torch only, no files watched, no daemon (see DESIGN.md)."""
