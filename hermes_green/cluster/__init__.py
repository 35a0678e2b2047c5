"""Past one host: several gateway and worker processes on one Redis (SCALE.md).

    node.py     a process's identity, role and the hooks the gateway calls
    lease.py    SET NX PX leases renewed and released by token-checking scripts
    members.py  who is alive, per role
    queue.py    the work streams, sharded by chat, read by workers through a consumer group

Only used when `gateway.store` names a Redis; the single-host default never imports it.
"""
