"""The slow lane's jobs, run with I/O: the work of a frame that may need PostgreSQL (a
recipient or receipt owner Redis lost), and look-ups the core cannot pipeline.

Each socket runs its slow jobs one at a time (the core holds its later frames until
they are done), so these may await freely.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from chatnode import frames, inbox, keys
from chatnode.core.actions import (
    CheckKnown,
    FetchEntries,
    Job,
    StoreMessage,
    StoreRead,
    StoreReceipts,
)
from chatnode.errors import InboxFull, UnknownRecipient
from chatnode.lua import ACK_DEVICE, RECEIPT, SEND, Script
from chatnode.recipients import Recipients
from chatnode.redisio import Redis

Loader = Callable[[str], Awaitable[bool]]  # copy a user into Redis; False if no such user


class SlowPath:
    def __init__(
        self,
        batcher: Redis,
        recipients: Recipients,
        inbox_limit: int,
        dedupe_window_s: int,
        push: bool = True,
    ) -> None:
        """`push` False (replica acks on): a message is stored without a push; the core
        nudges it once the store's reply says a replica has it."""
        self.batcher = batcher
        self.recipients = recipients
        self.limit = inbox_limit
        self.window = dedupe_window_s
        self.push = push

    async def run(self, job: Job) -> Any:
        """The job's result; its failure raised."""
        batcher, load, limit, window = self.batcher, self.recipients.load, self.limit, self.window
        match job:
            case StoreMessage(sender, frame, ts):
                return await store_message(
                    batcher, load, sender, frame, ts, limit, window, self.push
                )
            case FetchEntries(owner, msg_ids, device):
                return await fetch(batcher, owner, msg_ids, device)
            case StoreReceipts(acker, receipts, ack_ids, messages, device):
                for receipt in receipts:
                    try:
                        await store_receipt(batcher, load, receipt, limit)
                    except UnknownRecipient:
                        pass  # the sender's account is gone: nobody to tell
                if ack_ids:
                    await ack(batcher, acker, ack_ids, messages, window, device)
                return None
            case StoreRead(receipt):
                await store_receipt(batcher, load, receipt, limit)
                return None
            case CheckKnown(mobile):
                if not await batcher.run("EXISTS", keys.account(mobile)):
                    if not await load(mobile):
                        raise UnknownRecipient()
                return None
        raise TypeError(f"not a slow job: {job!r}")


async def _with_reload(
    batcher: Redis, load: Loader, owner: str, script: Script, keys_: list[str], args: list[Any]
) -> list[Any]:
    """Run an inbox script; if Redis lacks the owner, reload them from PostgreSQL once."""
    reply: list[Any] = await batcher.script(script, keys_, args)
    if reply[0] == "unknown":
        if not await load(owner):
            raise UnknownRecipient()
        reply = await batcher.script(script, keys_, args)
        if reply[0] == "unknown":
            raise UnknownRecipient()
    return reply


async def store_message(
    batcher: Redis,
    load: Loader,
    sender: str,
    send: frames.Send,
    ts: int,
    limit: int,
    window_s: int,
    push: bool = True,
) -> inbox.Stored:
    """Store a message, reloading the recipient from PostgreSQL if Redis lacks them."""
    call = inbox.message_call(sender, send, ts, limit, window_s, push)
    result = inbox.stored(await _with_reload(batcher, load, send.to, SEND, *call))
    assert result is not None
    return result


async def store_receipt(batcher: Redis, load: Loader, receipt: inbox.Receipt, limit: int) -> None:
    """Put a receipt in its owner's inbox, reloading the owner from PostgreSQL if Redis
    lacks them (a block may drop it). UnknownRecipient if there is no such user,
    InboxFull if a read receipt finds the inbox full."""
    reply = await _with_reload(batcher, load, receipt.owner, RECEIPT, *receipt.call(limit))
    if reply[0] == "full":
        raise InboxFull()


async def fetch(
    batcher: Redis, mobile: str, msg_ids: list[str], device: str = keys.DEFAULT_DEVICE
) -> list[inbox.Entry]:
    """The entries of `mobile`'s inbox with these ids that are pending in `device`'s
    group (delivered to it, not acked yet), one pipeline. An entry acked already (by a
    plain XACK, still in the stream until its trim; or acked by this device while
    another still holds it) is left out, as is one never delivered to the device."""
    box, group = keys.inbox(mobile), keys.group(device)
    held = [batcher.call("XPENDING", box, group, m, m, 1) for m in msg_ids]
    found = [batcher.call("XRANGE", box, m, m) for m in msg_ids]
    replies = await asyncio.gather(*held, *found, return_exceptions=True)
    for reply in replies:
        if isinstance(reply, BaseException) and not inbox.lost_group(reply):
            raise reply
    out: list[inbox.Entry] = []
    for mine, reply in zip(replies[: len(msg_ids)], replies[len(msg_ids) :], strict=True):
        if mine and not isinstance(mine, BaseException) and not isinstance(reply, BaseException):
            out.extend(inbox.decode(item[0], item[1]) for item in reply or ())
    return out


async def ack(
    batcher: Redis,
    mobile: str,
    msg_ids: list[str],
    messages: list[tuple[str, str]],
    window_s: int,
    device: str = keys.DEFAULT_DEVICE,
) -> None:
    """`device`'s ack of `msg_ids` (lua.ACK_DEVICE), and the acked `messages`' ((sender,
    client id)) dedupe keys shortened to the window (inbox.shorten), in one pipeline.
    An ack that fails raises."""
    removed = batcher.script(ACK_DEVICE, *inbox.ack_device_call(mobile, device, msg_ids))
    for command in inbox.shorten(mobile, messages, window_s):
        batcher.fire(*command)
    await removed
