"""The LMDB parameter store (DESIGN.md section 4). Imports stdlib, lmdb, msgpack, numpy and
``protocol`` only: never torch."""
from store.errors import (Conflict, LeaseHeld, LeaseLost, MissingReference, NotAStore,
                          StoreCorrupt, StoreError, StoreFull)
from store.records import (AgentRecord, AgentState, ComponentRecord, ComponentWrite, Event,
                           ModelRecord, TaskRecord, TrialRecord, component_id, parse_component_id)
from store.store import Store
from store.txnops import SCHEMA_VERSION

__all__ = [
    "AgentRecord", "AgentState", "ComponentRecord", "ComponentWrite", "Conflict", "Event",
    "LeaseHeld", "LeaseLost", "MissingReference", "ModelRecord", "NotAStore", "SCHEMA_VERSION",
    "Store", "StoreCorrupt", "StoreError", "StoreFull", "TaskRecord", "TrialRecord",
    "component_id", "parse_component_id",
]
