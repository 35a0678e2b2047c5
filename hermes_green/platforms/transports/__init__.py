"""Transports a platform adapter is built on: a WebSocket long connection, or HTTP long polling.
Each owns reading and keepalive for one kind of wire; the connection's life is the base's."""
