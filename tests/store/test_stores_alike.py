"""The memory and Redis stores answer alike: one sequence of calls, the same answers.

A hypothesis property: it generates a sequence of store calls (restores with current, old,
wrong or no tokens and various ``last_seq``, some out of range; turns, some re-sent; pushes
with messages, patches and acks; ``bye``; renewals; retries of each; clock steps past
``max_age``), runs it on a :class:`~gateway.store.memory_store.MemoryStore` and a
:class:`~gateway.store.redis_store.RedisStore` with the same clock, and compares every
answer (outcomes, sessions with ID, token, version, state, times, turns, seq and epoch,
replay and messages, refusals and errors) and, after every call, what each store holds of
each caller, field by field (what a later call could see, though no call shows it yet).
Session IDs and tokens come from the caller (the candidate), so nothing needs normalising.
Only the keys' TTLs are left out: Redis counts them on its own clock.

``HANGON_STORE_EXAMPLES`` sets the number of sequences (default 200, about 5 s); a long run
needs a longer per-test timeout, such as ``-o timeout=0``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core import codec
from gateway.core.callerkey import CallerKey
from gateway.core.sealing import aad
from gateway.core.session import (
    Push,
    ResumeToken,
    Session,
    SessionId,
    TurnWrite,
    empty_state,
)
from gateway.exceptions import StoreError
from gateway.store.base import SessionStore, StoreSettings, session_keys
from gateway.store.memory_store import MemoryStore
from gateway.store.redis_store import RedisStore
from tests.support.records import CALLER, OTHER, T0
from tests.support.stores import TEST_KEYRING

EXAMPLES = int(os.environ.get("HANGON_STORE_EXAMPLES", "200"))
CALLERS = (CALLER, OTHER)
OWNERS = ("", "gw-a", "gw-b")
OUT_OF_RANGE = (-1, 2**53, 2**62)
"""Values no store takes (the protocol refuses them first)."""

_caller = st.integers(0, 1)
_epoch = st.sampled_from([0, 0, 0, 0, 0, -1])
"""Offset from the epoch the connection holds: -1 is a superseded connection."""
_base = st.sampled_from([0, 0, 0, 0, 0, 0, -1, 1])
"""Offset from the version the connection holds: anything but 0 conflicts."""

ADVANCE = st.tuples(
    st.just("advance"),
    # Mostly short steps, some about half of max_age (20 s), some past it; never past the
    # TTL (an hour), which Redis counts on its own clock.
    st.one_of(st.integers(0, 3_000), st.integers(9_000, 12_000), st.integers(20_001, 26_000)),
)
RESTORE = st.tuples(
    st.just("restore"),
    _caller,
    st.integers(-2, 6),  # None, a wrong token, or the k-th newest token issued
    st.one_of(st.none(), st.integers(0, 8), st.integers(0, 8), st.sampled_from(OUT_OF_RANGE)),
    st.integers(0, len(OWNERS) - 1),
    st.booleans(),  # offer the last candidate again (a retry whose reply was lost)
)
TURN = st.tuples(
    st.just("turn"),
    _caller,
    st.sampled_from(["t1", "t2", "t3"]),  # few: some are re-sent
    _base,
    _epoch,
    st.booleans(),  # send the last write again, unchanged
)
PUSH = st.tuples(
    st.just("push"),
    _caller,
    st.integers(0, 3),  # messages
    st.booleans(),  # with a state patch
    st.integers(0, 8),  # acked seq
    _base,
    _epoch,
    st.booleans(),  # send the last push again, unchanged
)
END = st.tuples(st.just("end"), _caller, _epoch)
TOUCH = st.tuples(st.just("touch"), _caller, _epoch, st.integers(0, len(OWNERS) - 1))
OPS = st.one_of(
    ADVANCE, ADVANCE, ADVANCE, RESTORE, RESTORE, TURN, TURN, TURN, PUSH, PUSH, END, TOUCH
)
"""One call, or a clock step; ``bye`` ends a session for good, so it comes less often."""

_examples = itertools.count()


async def answer(call: Any) -> tuple[Any, ...]:
    """What a store call gave back, or which store error it raised."""
    try:
        return ("ok", await call)
    except StoreError as exc:
        return ("error", type(exc).__name__, exc.op, exc.detail, exc.retryable)


class Run:
    """One sequence of calls on both stores, with what a client would hold between them."""

    def __init__(self, stores: tuple[SessionStore, SessionStore]) -> None:
        self.stores = stores
        self.now = T0
        self.made = itertools.count(1)
        self.tokens: list[str] = []
        self.candidates: dict[int, Session] = {}
        self.views: dict[int, Session] = {}
        """The session each caller's connection holds: the last restore's."""
        self.turns: dict[int, tuple[SessionId, TurnWrite]] = {}
        self.pushes: dict[int, tuple[SessionId, Push]] = {}

    def view(self, c: int) -> Session:
        """The connection's session; a session no store knows before any restore."""
        if c not in self.views:
            self.views[c] = Session(
                SessionId("s_none"), ResumeToken("none"), 0, empty_state(), 0, 0
            )
        return self.views[c]

    async def both(self, step: int, op: tuple[Any, ...], call: Any) -> Any:
        """Make ``call(store)`` on both stores; their answers, and what they then hold,
        must be equal."""
        memory, redis = [await answer(call(store)) for store in self.stores]
        assert memory == redis, f"step {step} {op}: memory {memory} != redis {redis}"
        for caller in CALLERS:
            kept = (
                await memory_held(self.stores[0], caller),
                await redis_held(self.stores[1], caller),
            )
            assert kept[0] == kept[1], f"step {step} {op}: memory holds {kept[0]}, redis {kept[1]}"
        return memory[1] if memory[0] == "ok" else None

    async def restore(
        self,
        step: int,
        op: tuple[Any, ...],
        c: int,
        k: int,
        last_seq: int | None,
        o: int,
        again: bool,
    ) -> None:
        token = None
        if k >= 0 and k < len(self.tokens):
            token = self.tokens[-1 - k]
        elif k != -2:
            token = "never-issued"
        if not again or c not in self.candidates:
            n = next(self.made)
            self.candidates[c] = Session(
                SessionId(f"s_{n}"), ResumeToken(f"tok-{n}"), 0, empty_state(), self.now, self.now
            )
            self.tokens.append(f"tok-{n}")
        cand, now = self.candidates[c], self.now
        got = await self.both(
            step,
            op,
            lambda s: s.restore(
                CALLERS[c],
                token=token,
                candidate=cand,
                now_ms=now,
                last_seq=last_seq,
                owner=OWNERS[o],
            ),
        )
        if got is not None and got.session is not None:
            self.views[c] = got.session

    async def turn(
        self,
        step: int,
        op: tuple[Any, ...],
        c: int,
        turn_id: str,
        base: int,
        epoch: int,
        again: bool,
    ) -> None:
        if again and c in self.turns:
            sid, w = self.turns[c]
        else:
            v = self.view(c)
            n = next(self.made)
            state = {**v.state, "form_answers": {**v.state["form_answers"], turn_id: str(n)}}
            base_version = max(0, v.version + base)
            w = TurnWrite(
                turn_id,
                base_version,
                base_version + 1,
                state,
                self.now,
                codec.dumps(state),
                max(0, v.epoch + epoch),
                f"w{n}",
            )
            sid = v.session_id
            self.turns[c] = (sid, w)
        got = await self.both(step, op, lambda s: s.write_turn(CALLERS[c], sid, w))
        v = self.view(c)
        if got is not None and got.applied and v.session_id == sid and v.version == w.base_version:
            v.commit(w)

    async def push(
        self,
        step: int,
        op: tuple[Any, ...],
        c: int,
        count: int,
        patch: bool,
        acked: int,
        base: int,
        epoch: int,
        again: bool,
    ) -> None:
        if again and c in self.pushes:
            sid, p = self.pushes[c]
        else:
            v = self.view(c)
            n = next(self.made)
            patches = [{"context": {f"k{n}": n}}] if patch else []
            messages = [codec.dumps({"n": n, "i": i}) for i in range(count)]
            p = v.push(patches, messages, acked_seq=acked, now_ms=self.now)
            p = dataclasses.replace(
                p,
                epoch=max(0, p.epoch + epoch),
                base_version=max(0, p.base_version + base),
                version=max(0, p.version + base),
                push_id=f"p{n}",
            )
            sid = v.session_id
            self.pushes[c] = (sid, p)
        done = await self.both(step, op, lambda s: _pushed(s, CALLERS[c], sid, p))
        v = self.view(c)
        if done and v.session_id == sid and (v.version, v.seq) == (p.base_version, p.base_seq):
            v.commit_push(p)

    async def end(self, step: int, op: tuple[Any, ...], c: int, epoch: int) -> None:
        v, now = self.view(c), self.now
        sid, at = v.session_id, max(0, v.epoch + epoch)
        await self.both(step, op, lambda s: s.end(CALLERS[c], sid, now, epoch=at))

    async def touch(self, step: int, op: tuple[Any, ...], c: int, epoch: int, o: int) -> None:
        v, now = self.view(c), self.now
        sid, at = v.session_id, max(0, v.epoch + epoch)
        await self.both(
            step, op, lambda s: s.touch(CALLERS[c], sid, now, epoch=at, owner=OWNERS[o])
        )

    async def run(self, ops: list[tuple[Any, ...]]) -> None:
        # Both callers start with a session, so that most calls find one.
        for c in range(len(CALLERS)):
            await self.restore(-1, ("first",), c, -2, None, 1, False)
        for step, op in enumerate(ops):
            kind, args = op[0], op[1:]
            if kind == "advance":
                self.now += args[0]
            elif kind == "restore":
                await self.restore(step, op, *args)
            elif kind == "turn":
                await self.turn(step, op, *args)
            elif kind == "push":
                await self.push(step, op, *args)
            elif kind == "end":
                await self.end(step, op, *args)
            else:
                await self.touch(step, op, *args)
        # Last, each caller's session as a hello without a token finds it.
        for c in range(len(CALLERS)):
            await self.restore(len(ops), ("final",), c, -2, 0, 0, False)


async def memory_held(store: SessionStore, caller: CallerKey) -> dict[str, Any] | None:
    """What the memory store holds of ``caller``'s session, field by field (base.py's
    layout), opened: what a later call could see."""
    assert isinstance(store, MemoryStore)
    key = session_keys(store.settings.key_prefix, caller, TEST_KEYRING)[0]
    r = store._records.get(key)
    if r is None:
        return None
    first = r.seq - len(r.msgs) + 1
    return {
        "sid": r.sid,
        "tokens": (r.tokens.current, r.tokens.previous, r.tokens.retired, r.tokens.spare),
        "ver": r.ver,
        "state": TEST_KEYRING.open(r.state, aad(key, "state")),
        "created": r.created,
        "updated": r.updated,
        "origin": r.origin.value,
        "epoch": r.epoch,
        "seq": r.seq,
        "push": r.last_push,
        "wid": r.write_id,
        "owner": r.owner,
        "lease": r.lease,
        "ended": r.ended,
        "turns": r.turns,
        "msgs": [TEST_KEYRING.open(m, aad(key, f"msg:{first + i}")) for i, m in enumerate(r.msgs)],
    }


async def redis_held(store: SessionStore, caller: CallerKey) -> dict[str, Any] | None:
    """What the Redis store holds of ``caller``'s session, as :func:`memory_held` says it."""
    assert isinstance(store, RedisStore)
    key, turns, msgs = session_keys(store.settings.key_prefix, caller, TEST_KEYRING)
    h = {k.decode(): v for k, v in (await store.client.hgetall(key)).items()}
    if not h:
        return None
    text = {k: v.decode() for k, v in h.items() if k != "state"}
    seq = int(text.get("seq", "0"))
    held = await store.client.lrange(msgs, 0, -1)
    first = seq - len(held) + 1
    return {
        "sid": text["sid"],
        "tokens": tuple(text.get(f, "") for f in ("tok", "prev", "dead", "spare")),
        "ver": int(text["ver"]),
        "state": TEST_KEYRING.open(h["state"], aad(key, "state")),
        "created": int(text["created"]),
        "updated": int(text["updated"]),
        "origin": text["origin"],
        "epoch": int(text["epoch"]),
        "seq": seq,
        "push": text.get("push", ""),
        "wid": text.get("wid", ""),
        "owner": text["owner"],
        "lease": int(text["lease"]),
        "ended": int(text["ended"]) if "ended" in text else None,
        "turns": {
            m.decode(): int(v) for m, v in await store.client.zrange(turns, 0, -1, withscores=True)
        },
        "msgs": [TEST_KEYRING.open(m, aad(key, f"msg:{first + i}")) for i, m in enumerate(held)],
    }


async def _pushed(store: SessionStore, caller: Any, sid: SessionId, push: Push) -> bool:
    await store.push(caller, sid, push)
    return True


async def _run_both(redis_url: str, prefix: str, ops: list[tuple[Any, ...]]) -> None:
    config = StoreSettings(
        key_prefix=f"{prefix}{next(_examples)}:",
        ttl=3600.0,
        end_ttl=3600.0,
        max_age=20.0,
        replay_window=3,
        lease=10.0,
        keyring=TEST_KEYRING,
    )
    memory, redis = MemoryStore(config), RedisStore(redis_url, config)
    try:
        await Run((memory, redis)).run(ops)
    finally:
        await memory.aclose()
        await redis.aclose()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    # key_prefix is the test's; each example takes a prefix of its own under it.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, min_size=1, max_size=30))
def test_stores_answer_alike(redis_url: str, key_prefix: str, ops: list[tuple[Any, ...]]) -> None:
    """The memory and Redis stores give the same answer to every call of any sequence of
    restores, turns, pushes, ends and renewals, retries and clock steps."""
    asyncio.run(_run_both(redis_url, key_prefix, ops))
