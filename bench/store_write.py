"""How long one SQLite write holds the hub (the store runs on the hub; WAL, synchronous=NORMAL).

    python bench/store_write.py [--n 5000]

Prints JSON: p50/p99/max per operation on a real file in a temporary directory.
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
          "hub_held_per_call": {k: ms_summary(v) for k, v in timings.items()}})


if __name__ == "__main__":
    main()
