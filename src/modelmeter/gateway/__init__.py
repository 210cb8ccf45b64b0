"""The HTTP edge: app factory, dependencies, authentication and routes."""
