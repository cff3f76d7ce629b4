"""Session stores: one interface (:mod:`.base`), a memory and a Redis implementation."""

from gateway.store.base import Restored, SessionStore, StoreSettings, Written, session_keys

__all__ = ["Restored", "SessionStore", "StoreSettings", "Written", "session_keys"]
