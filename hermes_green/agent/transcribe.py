"""Voice to text through an OpenAI-compatible `POST {base_url}/audio/transcriptions`.

The request is what OpenAI's API reference describes: multipart/form-data with `file` (the
audio, its filename carrying the format) and `model` (and `language` when configured); the
answer is JSON `{"text": ...}`. Whisper servers (OpenAI, faster-whisper-server, LocalAI, vLLM)
speak it. Used by the gateway's media module for voice messages the platform did not transcribe
itself (WeCom and QQ send their own transcript; Telegram, Discord, Feishu do not).

Errors name the host and the status, never the key.
"""
from __future__ import annotations

import mimetypes
import os
from urllib.parse import urlsplit


from .. import rest
from ..files import read_file

MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's limit for one transcription request


class TranscriptionError(Exception):
    """No transcript; the message is one line without secrets."""


class Transcriber:
    def __init__(self, *, base_url: str, model: str, api_key: str | None = None,
                 language: str | None = None, timeout_s: float = 60.0) -> None:
        self.url = base_url.rstrip("/") + "/audio/transcriptions"
        self.host = urlsplit(base_url).netloc or base_url
        self.model, self.language, self.timeout_s = model, language, timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = rest.Session()

    @classmethod
    def from_config(cls, agent_cfg) -> "Transcriber | None":
        """From `agent.transcribe` (None when it is not configured)."""
        t = getattr(agent_cfg, "transcribe", None) if agent_cfg is not None else None
        if t is None:
            return None
        key = t.api_key or agent_cfg.api_key
        return cls(base_url=t.base_url or agent_cfg.base_url, model=t.model,
                   api_key=key.get_secret_value() if key is not None else None,
                   language=t.language, timeout_s=t.timeout_s)

    def transcribe(self, path: str, mime: str | None = None, name: str | None = None) -> str:
        try:
            audio = read_file(path, MAX_AUDIO_BYTES)
        except (OSError, ValueError) as e:
            raise TranscriptionError(f"cannot read the audio ({type(e).__name__})") from None
        filename = name or os.path.basename(path)
        if "." not in filename:
            filename += mimetypes.guess_extension(mime or "") or ".ogg"
        data = {"model": self.model}
        if self.language:
            data["language"] = self.language
        try:
            resp = self._http.post(self.url, headers=self._headers, data=data, timeout=(
                10.0, self.timeout_s), files={"file": (filename, audio,
                                                        mime or "application/octet-stream")})
        except rest.RequestException as e:
            raise TranscriptionError(f"{self.host}: request failed ({type(e).__name__})") \
                from None
        if resp.status_code != 200:
            raise TranscriptionError(f"{self.host}: HTTP {resp.status_code}")
        try:
            text = resp.json()["text"]
        except (ValueError, KeyError, TypeError):
            raise TranscriptionError(f"{self.host}: the answer has no text") from None
        if not isinstance(text, str):
            raise TranscriptionError(f"{self.host}: the answer has no text")
        return " ".join(text.split())

    def close(self) -> None:
        self._http.close()
