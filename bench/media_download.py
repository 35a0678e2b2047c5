"""Hub lateness while large files download, and how fast they do: a gateway (echo agent) on the
strict WeCom fake, users sending 19 MB encrypted files (AES-256-CBC, decrypted as they stream)
served at full loopback speed, N at once; the hub's 50 ms lateness probe and WeCom's keepalive
lateness are recorded during the downloads only. The fake serves from the same process, so the
numbers include its own work of sending the bytes: an upper bound for the gateway's share.

    python bench/media_download.py [--files 8] [--mb 19]     (JSON on stdout)
"""
import argparse
import base64
import os
import tempfile
import time

from _common import emit, machine, ms_summary  # noqa: E402  (runtime first)

from hermes_green.config import Config  # noqa: E402
from hermes_green.gateway import Gateway  # noqa: E402
from hermes_green.runtime import HubWatch  # noqa: E402
from hermes_green.testing.fake_wecom import FakeWeComServer, encrypt_file  # noqa: E402


def run(files: int, mb: int) -> dict:
    wecom = FakeWeComServer(ping_interval_s=0.5, keepalive_deadline_s=1.0).start()
    data_dir = tempfile.mkdtemp(prefix="media-bench-")
    config = Config.model_validate({
        "gateway": {"data_dir": data_dir, "status": {"enabled": False}},
        "media": {"max_bytes": (mb + 1) * 1024 * 1024, "concurrent_downloads": files},
        "platforms": {"wecom": {"bot_id": wecom.bot_id, "secret": wecom.secret,
                                "url": wecom.ws_url, "ping_interval_s": 0.5}}})
    sources = []  # made before the gateway connects: this setup holds the hub for seconds
    for _ in range(files):
        key = os.urandom(32)
        data = b"\x89PNG\r\n\x1a\n" + os.urandom(mb * 1024 * 1024)
        sources.append((wecom.host_media(encrypt_file(data, key), ttl_s=600), key))
    watch = HubWatch()
    gw = Gateway(config, hub_watch=watch).start()
    try:
        while not ("wecom" in gw.adapters and gw.adapters["wecom"].ready.is_set()):
            time.sleep(0.01)
        time.sleep(1.0)  # a few keepalives on the timetable first
        watch.lateness.clear()
        pings_before = {c: len(t) for c, t in wecom.keepalive_times.items()}
        started = time.monotonic()
        mids = [wecom.send_user_message(msgtype="file", userid=f"user{i}", payload={
            "url": url, "aeskey": base64.b64encode(key).decode().rstrip("=")})
            for i, (url, key) in enumerate(sources)]
        wecom.wait_for(lambda: all(wecom.replies_to(m) for m in mids), timeout=120)
        elapsed = time.monotonic() - started
        late = list(watch.lateness)
        conn = wecom.current_conn_id
        ping_late = [max(0.0, x) for x in wecom.keepalive_lateness(conn, 0.5)
                     [pings_before.get(conn, 0):]]
        disconnects = [d.reason for d in wecom.disconnects]
    finally:
        gw.shutdown()
        wecom.stop()
    return {"bench": "media_download", "machine": machine(), "files": files, "mb_each": mb,
            "seconds": round(elapsed, 3),
            "mb_per_s": round(files * mb / elapsed, 1),
            "hub_lateness": ms_summary(late), "keepalive_lateness": ms_summary(ping_late),
            "disconnects": disconnects,
            "stored": gw.media.downloads}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--mb", type=int, default=19)
    args = ap.parse_args()
    emit(run(args.files, args.mb))
