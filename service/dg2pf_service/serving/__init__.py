"""Hosting pruned models on Ray Serve: the replica-side app, the model registry they share with
the API, and the API-side supervisor that keeps the application deployed."""
