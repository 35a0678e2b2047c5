"""How long one SQLite write holds the hub (the store runs on the hub; WAL, synchronous=NORMAL).

    python bench/store_write.py [--n 5000] [--messages 20000]

Prints JSON: p50/p99/max per operation on a real file in a temporary directory, and what one
answered message costs the store in CPU and WAL pages.
"""
import argparse
import tempfile
import time

from _common import emit, machine, ms_summary

from hermes_green.models import InboundMessage, OutboundMessage
from hermes_green.store import Store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--messages", type=int, default=20000, help="for the per-message cost")
    args = ap.parse_args()
    timings: dict[str, list[float]] = {"journal_inbound": [], "mark_processing": [],
                                       "finish_turn": [], "outbox_done": []}
    with tempfile.TemporaryDirectory() as d:
        store = Store(d).open()
        for i in range(args.n):
            msg = InboundMessage("qqbot", f"m{i}", f"chat{i % 50}", "u", "hello " * 20,
                                 reply_ref={"msg_id": f"m{i}", "kind": "c2c"})
            t = time.perf_counter()
            store.journal_inbound(msg)
            timings["journal_inbound"].append(time.perf_counter() - t)
            t = time.perf_counter()
            store.mark_processing("qqbot", [msg.message_id])
            timings["mark_processing"].append(time.perf_counter() - t)
            part = OutboundMessage("qqbot", msg.chat_id, "answer " * 40, in_reply_to=msg.message_id,
                                   reply_ref=msg.reply_ref)
            t = time.perf_counter()
            ids = store.finish_turn("qqbot", msg.chat_id, [msg.message_id], [part],
                                    user_text=msg.text, answer_text=part.text)
            timings["finish_turn"].append(time.perf_counter() - t)
            t = time.perf_counter()
            store.outbox_done(ids[0])
            timings["outbox_done"].append(time.perf_counter() - t)
            if i % 500 == 499:
                store.checkpoint()  # as the gateway's checkpoint greenlet does, off the hub
        store.close()
    emit({"bench": "store_write", "machine": machine(), "n": args.n,
          "hub_held_per_call": {k: ms_summary(v) for k, v in timings.items()},
          "per_message": per_message(args.messages)})


def per_message(n: int) -> dict:
    """What the store costs one answered message over a growing file, as the throughput burst
    drives it (200 chats): journal, processing mark, end of turn, outbox row gone; and the WAL
    frames (4 KiB pages) those commits append per message."""
    with tempfile.TemporaryDirectory() as d:
        store = Store(d).open()
        cpu0, frames = time.process_time(), 0
        for i in range(n):
            msg = InboundMessage("wecom", f"m{i}", f"chat{i % 200}", "u", f"burst {i}",
                                 reply_ref={"req_id": f"r{i}", "msgid": f"m{i}"})
            store.journal_inbound(msg)
            store.mark_processing("wecom", [msg.message_id])
            part = OutboundMessage("wecom", msg.chat_id, f"echo: burst {i}",
                                   in_reply_to=msg.message_id, reply_ref=msg.reply_ref)
            ids = store.finish_turn("wecom", msg.chat_id, [msg.message_id], [part],
                                    user_text=msg.text, answer_text=part.text)
            store.outbox_done(ids[0])
            if i % 1000 == 999:
                frames += store._checkpoint_blocking()[0]  # frames since the last restart
                store.checkpoint()
        cpu_s = time.process_time() - cpu0
        store.close()
    return {"messages": n, "cpu_us_per_message": round(cpu_s / n * 1e6),
            "wal_frames_per_message": round(frames / n, 1)}


if __name__ == "__main__":
    main()
