"""The LMDB parameter store (docs/design.md section 4). Imports stdlib, lmdb, msgpack, numpy and
``protocol`` only: never torch."""
from store.errors import (Conflict, LeaseHeld, LeaseLost, MissingReference, NotAStore,
                          StoreCorrupt, StoreDiskError, StoreError, StoreFull, StoreUnavailable)
from store.records import (AgentRecord, AgentState, ComponentRecord, ComponentWrite, Event,
                           ModelRecord, Publication, TaskRecord, TrialRecord, component_id, parse_component_id)
from store.store import Store
from store.api import StoreAPI, is_remote, open_store
from store.txnops import SCHEMA_VERSION

__all__ = [
    "AgentRecord", "AgentState", "ComponentRecord", "ComponentWrite", "Conflict", "Event",
    "LeaseHeld", "LeaseLost", "MissingReference", "ModelRecord", "NotAStore", "Publication", "SCHEMA_VERSION",
    "Store", "StoreAPI", "StoreCorrupt", "StoreDiskError", "StoreError", "StoreFull", "StoreUnavailable", "TaskRecord", "TrialRecord",
    "component_id", "is_remote", "open_store", "parse_component_id",
]
