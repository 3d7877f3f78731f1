"""The memories: stateful components with one shape of API (docs/CONTRACTS.md).

- lemur.py        ItemMemoryBank (item key -> latest doc-encoder vector, TTL/LRU, freed rows)
                  and DocEncoder (hashed-word Transformer, or all-MiniLM-L6-v2 fine-tuned)
- lmn.py          UserMemory: one product-key memory shared by all users + memory loss
- pkm.py          ProductKeyMemory (MSN layer, usage stats, dead-key reinit) and MemoryGate
- history.py      UserHistoryStore: per-user ring buffers on the device of the last L
                  (item code, item key, bank row, time, signal), keyed by user key
- sparse_optim.py SparseRowAdam: row-sparse Adam for sparse COO gradients (values, id tables)

Every component: stats() -> dict (JSON-able); export_state() -> (tensors, meta) for
safetensors + JSON and import_state(tensors, meta), bit-exact; take_delta() -> MemoryDelta
(rows changed since the previous call) and apply_delta(delta) on a serving copy. Modules are
imported by their own path (`from memory_bank.pkm import ProductKeyMemory`); nothing here
imports Ray, Kafka or `stream`.
"""
