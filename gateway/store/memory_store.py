"""The embedded store: one process, nothing survives a restart.

It keeps the same records, lifetimes and decisions as the Redis store (the
shared store tests run against both), sealed the same way: state is serialised
with orjson and sealed, so a caller can never alias stored state.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gateway.core import codec
from gateway.core.callerkey import CallerKey
from gateway.core.resume import Outcome, Tokens, classify, plan_replay, token_digest
from gateway.core.sealing import Keyring, aad
from gateway.core.session import Push, ResumeToken, Session, SessionId, TurnWrite, remember
from gateway.store.base import (
    Restored,
    StoreSettings,
    Takeover,
    Written,
    check_int,
    check_push,
    check_renewal,
    check_restore,
    check_turn,
    conflict,
    session_keys,
)

__all__ = ["MemoryStore"]

_SWEEP_EVERY = 1024


@dataclass(slots=True)
class _Record:
    sid: SessionId
    tokens: Tokens
    """Digests of the resume tokens that still count."""
    ver: int
    state: bytes
    """Sealed."""
    created: int
    updated: int
    expires: int
    origin: Outcome
    ended: int | None = None
    turns: dict[str, int] = field(default_factory=dict)
    epoch: int = 1
    seq: int = 0
    last_push: str = ""
    write_id: str = ""
    owner: str = ""
    lease: int = 0
    msgs: list[bytes] = field(default_factory=list)
    """Messages ``seq - len(msgs) + 1`` to ``seq``, sealed."""

    def session(self, keyring: Keyring, key: str, token: ResumeToken) -> Session:
        return Session(
            self.sid,
            token,
            self.ver,
            codec.loads(keyring.open(self.state, aad(key, "state"))),
            self.created,
            self.updated,
            dict(self.turns),
            seq=self.seq,
            epoch=self.epoch,
            last_push=self.last_push,
        )

    def restored(
        self,
        keyring: Keyring,
        key: str,
        token: ResumeToken,
        outcome: Outcome,
        last_seq: int | None,
        displaced: str | None = None,
    ) -> Restored:
        first = self.seq - len(self.msgs) + 1
        replay = plan_replay(last_seq, seq=self.seq, first=first)
        messages = tuple(
            keyring.open(sealed, aad(key, f"msg:{replay.start + i}"))
            for i, sealed in enumerate(self.msgs[replay.start - first :])
        )
        return Restored(outcome, self.session(keyring, key, token), replay, messages, displaced)


class MemoryStore:
    """A :class:`~gateway.store.base.SessionStore` in a dict.

    Gateways in one process may share it; takeover notifications then reach
    them as Redis pub/sub would.
    """

    name = "memory"

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self._records: dict[str, _Record] = {}
        self._ops = 0
        self._listeners: dict[str, Takeover] = {}

    def _get(self, caller: CallerKey, now_ms: int) -> tuple[str, _Record | None]:
        key = session_keys(self.settings.key_prefix, caller, self.settings.keyring)[0]
        self._ops += 1
        if self._ops % _SWEEP_EVERY == 0:
            self._sweep(now_ms)
        record = self._records.get(key)
        if record is not None and record.expires <= now_ms:
            del self._records[key]
            record = None
        return key, record

    def _fenced(
        self, op: str, caller: CallerKey, session_id: SessionId, now_ms: int, epoch: int
    ) -> tuple[str, _Record]:
        """The key and record of ``session_id`` for a write at ``epoch``, as turn.lua and
        push.lua fence theirs (``fenced`` in check.lua).

        Raises:
            StoreConflict: ``gone`` if the caller's record is missing or another session,
                ``superseded`` if a newer hello moved it past ``epoch``.
        """
        key, record = self._get(caller, now_ms)
        if record is None or record.sid != session_id:
            raise conflict(op, "gone")
        if record.epoch != epoch:
            raise conflict(op, "superseded")
        return key, record

    def _sweep(self, now_ms: int) -> None:
        for key in [k for k, r in self._records.items() if r.expires <= now_ms]:
            del self._records[key]

    def _ttl_ms(self) -> int:
        return int(self.settings.ttl * 1000)

    async def restore(
        self,
        caller: CallerKey,
        *,
        token: str | None,
        candidate: Session,
        now_ms: int,
        last_seq: int | None = None,
        owner: str = "",
    ) -> Restored:
        check_restore(candidate, now_ms=now_ms, last_seq=last_seq, owner=owner)
        lease = now_ms + int(self.settings.lease * 1000)
        check_int("restore", "lease_ms", lease)  # as restore.lua
        key, record = self._get(caller, now_ms)
        keyring, new = self.settings.keyring, candidate.resume_token
        if record is not None and record.sid == candidate.session_id:
            return record.restored(keyring, key, new, record.origin, last_seq)
        presented = None if token is None else token_digest(token)
        max_age = self.settings.max_age
        decision = classify(
            exists=record is not None,
            ended=record is not None and record.ended is not None,
            updated_ms=record.updated if record else 0,
            tokens=record.tokens if record else Tokens(""),
            token=presented,
            version=record.ver if record else 0,
            origin=record.origin if record else Outcome.MISS,
            now_ms=now_ms,
            max_age_ms=None if max_age is None else int(max_age * 1000),
        )
        outcome = decision.outcome
        if outcome in (Outcome.REFUSED, Outcome.ENDED):
            return Restored(outcome, None, replayed=decision.replayed)
        if not decision.replace:
            assert record is not None
            record.updated = now_ms
            record.expires = now_ms + self._ttl_ms()
            record.epoch += 1
            displaced = None
            if record.owner not in ("", owner) and record.lease > now_ms:  # '': released
                displaced = record.owner
            record.owner, record.lease = owner, lease
            record.tokens = record.tokens.rotate(presented, token_digest(new))
            return record.restored(keyring, key, new, outcome, last_seq, displaced)
        record = self._records[key] = _Record(
            candidate.session_id,
            Tokens(token_digest(new)),
            candidate.version,
            self.settings.keyring.seal(codec.dumps(candidate.state), aad(key, "state")),
            now_ms,
            now_ms,
            now_ms + self._ttl_ms(),
            outcome,
            owner=owner,
            lease=lease,
        )
        # As restore.lua: last_seq is compared with the new session (seq 0), so a client that
        # had seen messages is told the replay is partial (docs/protocol.md).
        return record.restored(keyring, key, new, outcome, last_seq)

    async def write_turn(
        self, caller: CallerKey, session_id: SessionId, write: TurnWrite
    ) -> Written:
        check_turn(session_id, write)
        key, record = self._fenced("write_turn", caller, session_id, write.at_ms, write.epoch)
        seen = record.turns.get(write.turn_id)
        if seen is not None:
            # As in turn.lua: the stored state is this very write's, which landed before.
            mine = seen == record.ver == write.version and record.write_id == write.write_id
            # turn.lua writes here (so that a WAIT covers the write that applied the turn):
            # a re-sent turn counts as activity, never back in time.
            record.updated = max(record.updated, write.at_ms)
            return Written(seen, applied=mine)
        if record.ended is not None:
            raise conflict("write_turn", "ended")
        if record.ver != write.base_version:
            raise conflict("write_turn", "conflict", record.ver)
        record.ver = write.version
        record.state = self.settings.keyring.seal(write.encoded, aad(key, "state"))
        record.write_id = write.write_id
        record.updated = write.at_ms
        record.expires = write.at_ms + self._ttl_ms()
        remember(record.turns, write.turn_id, write.version)
        return Written(write.version, applied=True)

    async def push(self, caller: CallerKey, session_id: SessionId, push: Push) -> None:
        check_push(session_id, push)
        key, record = self._fenced("push", caller, session_id, push.at_ms, push.epoch)
        if record.ended is not None:
            raise conflict("push", "ended")
        if record.last_push == push.push_id:
            # As in push.lua: an earlier try of this push landed; it counts as activity,
            # never back in time.
            record.updated = max(record.updated, push.at_ms)
            return
        if record.ver != push.base_version or record.seq != push.base_seq:
            raise conflict("push", "conflict", record.ver)
        keyring = self.settings.keyring
        if push.encoded is not None:
            record.ver = push.version
            record.state = keyring.seal(push.encoded, aad(key, "state"))
        record.seq = push.seq
        record.last_push = push.push_id
        record.updated = push.at_ms
        record.expires = push.at_ms + self._ttl_ms()
        msgs = record.msgs + [
            keyring.seal(data, aad(key, f"msg:{push.base_seq + 1 + i}"))
            for i, data in enumerate(push.messages)
        ]
        held = len(msgs)
        drop = max(held - self.settings.replay_window, push.acked_seq - (push.seq - held))
        record.msgs = msgs[max(drop, 0) :]

    async def end(
        self, caller: CallerKey, session_id: SessionId, now_ms: int, *, epoch: int
    ) -> None:
        check_renewal("end", session_id, now_ms=now_ms, epoch=epoch)
        _, record = self._get(caller, now_ms)
        if record is None or record.sid != session_id:
            return
        if record.ended is not None:
            record.updated = now_ms  # as end.lua: a retried bye sets it again
            return
        if record.epoch != epoch:
            raise conflict("end", "superseded")
        record.ended = record.updated = now_ms
        record.expires = now_ms + int(self.settings.end_ttl * 1000)

    async def touch(
        self, caller: CallerKey, session_id: SessionId, now_ms: int, *, epoch: int, owner: str
    ) -> None:
        check_renewal("touch", session_id, now_ms=now_ms, epoch=epoch, owner=owner)
        lease = now_ms + int(self.settings.lease * 1000)
        check_int("touch", "lease_ms", lease)  # as touch.lua
        _, record = self._get(caller, now_ms)
        if record is not None and record.sid == session_id and record.ended is None:
            if record.epoch != epoch:
                raise conflict("touch", "superseded")
            record.updated = now_ms
            record.expires = now_ms + self._ttl_ms()
            record.owner = owner
            record.lease = lease

    async def notify(self, owner: str, session_id: SessionId, epoch: int) -> None:
        listener = self._listeners.get(owner)
        if listener is not None:
            asyncio.get_running_loop().call_soon(listener, session_id, epoch)

    async def listen(self, owner: str, on_takeover: Takeover) -> None:
        self._listeners[owner] = on_takeover
        try:
            await asyncio.Event().wait()
        finally:
            del self._listeners[owner]

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._records.clear()
