"""gradpool."""
