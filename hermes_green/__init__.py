"""hermes-green: a gevent gateway that keeps an AI agent connected to chat platforms.

Nothing is imported here: entry points import `hermes_green.runtime` first (it monkey-patches).
"""
__version__ = "0.1.0"
