"""The HTTP layer: the app factory, request reading, the server and the dashboard."""
