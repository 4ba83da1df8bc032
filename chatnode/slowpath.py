"""The slow lane's jobs, run with I/O: the work of a frame that may need PostgreSQL
(a recipient or receipt owner Redis lost), or a look-up the core cannot pipeline.

Each socket runs its slow jobs one at a time (the core holds its later frames until
they are done), so these may await freely.
"""

from __future__ import annotations

from typing import Any

from chatnode import inbox, keys
from chatnode.core.actions import (
    CheckKnown,
    FetchEntries,
    Job,
    StoreMessage,
    StoreRead,
    StoreReceipts,
)
from chatnode.errors import UnknownRecipient
from chatnode.recipients import Recipients
from chatnode.redisio import Batcher


class SlowPath:
    def __init__(self, batcher: Batcher, recipients: Recipients, inbox_limit: int) -> None:
        self.batcher = batcher
        self.recipients = recipients
        self.limit = inbox_limit

    async def run(self, job: Job) -> Any:
        """The job's result; its failure raised."""
        batcher, load, limit = self.batcher, self.recipients.load, self.limit
        match job:
            case StoreMessage(sender, frame, ts):
                return await inbox.enqueue_message(batcher, load, sender, frame, ts, limit)
            case FetchEntries(owner, msg_ids):
                return await inbox.fetch(batcher, owner, msg_ids)
            case StoreReceipts(acker, receipts, ack_ids):
                for receipt in receipts:
                    try:
                        await inbox.enqueue_receipt(batcher, load, receipt, limit)
                    except UnknownRecipient:
                        pass  # the sender's account is gone: nobody to tell
                if ack_ids:
                    await inbox.ack(batcher, acker, ack_ids)
                return None
            case StoreRead(receipt):
                await inbox.enqueue_receipt(batcher, load, receipt, limit)
                return None
            case CheckKnown(mobile):
                if not await batcher.run("EXISTS", keys.account(mobile)):
                    if not await load(mobile):
                        raise UnknownRecipient()
                return None
        raise TypeError(f"not a slow job: {job!r}")
