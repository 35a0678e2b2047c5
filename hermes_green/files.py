"""Reading a local file without holding the hub, for whoever needs one (an adapter uploading a
file, the agent reading an image or a voice note): neutral ground, so neither the agent nor a
platform has to import the other's modules."""
from __future__ import annotations

import os

import gevent


def read_file(path: str, limit: int | None = None) -> bytes:
    """The file's bytes, read in gevent's threadpool (file reads release the GIL). Raises
    OSError when it is gone; ValueError when it is larger than `limit`."""

    def read() -> bytes:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if limit is not None and size > limit:
                raise ValueError(f"{size} bytes, over the limit of {limit}")
            return f.read()

    return gevent.get_hub().threadpool.apply(read)
