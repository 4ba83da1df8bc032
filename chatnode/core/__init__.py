"""The socket-side core: one authenticated socket's state machine, without I/O.

The way websockets splits its `Protocol` from its connections, `SocketCore` takes events
(a frame arrived, a Redis reply, entries pushed, a timer, the socket drained) and leaves
actions on its `actions` list (Redis calls, a slow job, pause or resume reading, close)
and frames on its outbox. The gateway (gateway.py) is the driver: it feeds the events
and carries out the actions. Nothing here opens a socket, awaits, or reads the clock
except through `Node.clock`, so the unit tests drive a core with plain calls.

    socket.py    SocketCore: lifecycle, frames in, limits, send, typing
    acks.py      Acks: ack frames (receipts first, then XACK; trimmed later) and read receipts
    meter.py     Meter: the socket's rate limits, invalid frames, refusals in a row
    lane.py      SlowLane: frames whose work may need PostgreSQL, one at a time
    delivery.py  Delivery: catch-up -> live -> lagging, redelivery
    ledger.py    Ledger: what is out on the socket and not acked yet
    answers.py   Answers: answers in frame order, the frames to write this turn
    actions.py   the actions, the slow jobs, and the node context a core reads
"""
