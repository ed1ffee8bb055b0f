"""Benchmarks of registration and token verification under gunicorn; run with ``python -m benchmarks``."""
