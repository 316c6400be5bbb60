"""Shared by server and clients: tasks, models, metrics, wire format, config, crypto.

Both sides import these definitions, so they can never disagree on a model or a metric.
"""
