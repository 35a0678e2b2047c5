"""Baselines for bench/cascade.py: small, honest asyncio gateways speaking the same three
protocols (WeCom, Feishu, QQ Bot) to the same strict fakes as hermes-green.

They are written the way a typical asyncio gateway is written (hermes-agent's shape):
one asyncio loop holds all three WebSocket connections (the `websockets` library), each with a
heartbeat task built on `asyncio.sleep`; REST and the LLM go over `httpx.AsyncClient` on the same
loop (streaming chat completions, as the OpenAI SDK does); each inbound message becomes a task
that runs the agent turn and sends the reply. Run as a subprocess:

    python bench/baselines/main.py --config cfg.json --tools inline|threads

    --tools inline    tools run on the loop (`count_primes(...)` called from the coroutine):
                      the architecture of the gateway that fails
    --tools threads   tools go to `loop.run_in_executor(None, ...)`: the usual proposed fix

What they model, to be fair to them:
- each protocol as the strict fakes require it: WeCom subscribe / ping / stream finish with the
  callback req_id and its ack; Feishu endpoint POST, protobuf ping control frames, the
  ack (same frame + biz_rt, {"code": 200}) sent at once on receipt, tenant token, REST reply;
  QQ token, gateway URL, hello / identify / heartbeat with the last seq / resume after a drop,
  REST passive reply with msg_seq;
- heartbeats on a fixed timetable from the moment the protocol allows them (a sleep-after-send
  loop would drift and look worse than the loop's blocking alone);
- Feishu's PingInterval honoured from the endpoint and from pongs;
- an in-memory de-duplication of inbound message ids (Feishu redelivers unacked events) and
  per-chat serialization with an asyncio.Lock;
- reconnect after any drop with a fixed 2 s delay (the competitor's ~2 s);
- a send that raises is retried in memory, 3 attempts 1 s apart (a typical send-with-retry).

What they deliberately leave out (that is what hermes-green adds, and what is being measured):
- no journal, no outbox, no durable dedup: a reply that cannot be sent within its in-memory
  retries (WeCom: the connection is down; any platform: the process stops) is lost;
- no executor choice per tool (CPU work in processes): inline or one thread pool, that is all;
- no zombie detection (a connection is dead when the socket says so), no jittered backoff;
- no progress updates (WeCom streams are sent once, finished), no splitting of long answers:
  less work than hermes-green does, which favours the baselines.

They import `hermes_green.agent.demo_tools` for the tool functions only (that module imports
nothing that monkey-patches); never `hermes_green.runtime`.
"""
