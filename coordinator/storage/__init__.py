"""Storage: the store (SQLite), content-addressed blobs and the state directory's lock."""
