import json
import os

import numpy as np
import pytest
import torch

from memory_bank.base import MemoryDelta
from stream.snapshots.store import (
    DeltaState,
    FullState,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotNotFound,
    SnapshotStore,
    delta_table_from_parquet,
    delta_table_to_parquet,
)


def _full(seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    mem = {"pkm": ({"values": torch.randn(10, 4, generator=g)}, {"n": 10})}
    return FullState(dense, mem)


def _delta(rows, vals):
    d = MemoryDelta(tables={"values": (np.asarray(rows), vals)}, ids={"users": [f"u{r}" for r in rows]})
    return DeltaState({"w": torch.ones(4, 3), "b": torch.zeros(3)}, {"pkm": d})


def test_parquet_row_roundtrip_dtypes():
    for dt in (torch.float32, torch.bfloat16, torch.int64):
        vals = (torch.randn(5, 2, 3) * 10).to(dt)
        rows, back, ids = delta_table_from_parquet(
            delta_table_to_parquet(np.arange(5), vals, [f"i{i}" for i in range(5)])
        )
        assert back.dtype == dt and torch.equal(back, vals)
        assert ids == [f"i{i}" for i in range(5)] and rows.tolist() == list(range(5))


def test_full_then_deltas_chain(tmp_path):
    store = SnapshotStore(str(tmp_path / "snaps"))
    store.publish_full(1, _full(), {"train_step": 10})
    store.publish_delta(2, 1, _delta([1, 3], torch.full((2, 4), 7.0)), {"train_step": 20})
    store.publish_delta(3, 2, _delta([3], torch.full((1, 4), 9.0)))
    assert store.versions() == [1, 2, 3] and store.latest_version() == 3
    chain = store.load_chain()
    assert chain.versions == [1, 2, 3]
    assert torch.equal(chain.full.memories["pkm"][0]["values"], _full().memories["pkm"][0]["values"])
    assert [d.memories["pkm"].tables["values"][0].tolist() for d in chain.deltas] == [[1, 3], [3]]
    assert chain.deltas[0].memories["pkm"].ids == {"users": ["u1", "u3"]}
    assert torch.equal(chain.deltas[-1].dense["w"], torch.ones(4, 3))


def test_half_written_version_is_invisible(tmp_path):
    store = SnapshotStore(str(tmp_path))
    store.publish_full(1, _full())
    os.makedirs(tmp_path / "v000002")
    (tmp_path / "v000002" / "dense.safetensors").write_bytes(b"partial")
    assert store.versions() == [1]
    with pytest.raises(SnapshotNotFound):
        store.load_chain(2)


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete", "manifest_hash"])
def test_damaged_files_are_refused(tmp_path, damage):
    store = SnapshotStore(str(tmp_path))
    store.publish_full(1, _full())
    store.publish_delta(2, 1, _delta([0], torch.zeros(1, 4)))
    vdir = tmp_path / "v000002"
    target = next(p for p in vdir.iterdir() if p.name.startswith("delta."))
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        b = bytearray(data)
        b[len(b) // 2] ^= 0x10
        target.write_bytes(bytes(b))
    elif damage == "delete":
        target.unlink()
    else:
        m = json.loads((vdir / "manifest.json").read_text())
        m["files"][target.name]["sha256"] = "0" * 64
        (vdir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SnapshotCorrupt):
        store.load_chain(2)
    store.load_chain(1)  # the previous version still loads


def test_retention_keeps_chain_to_full(tmp_path):
    store = SnapshotStore(str(tmp_path), keep_versions=2)
    store.publish_full(1, _full())
    for v in range(2, 6):
        store.publish_delta(v, v - 1, _delta([0], torch.zeros(1, 4)))
    # versions 4 and 5 are kept, and 1..3 too because 5's chain needs them
    assert store.versions() == [1, 2, 3, 4, 5]
    store.publish_full(6, _full())
    store.publish_delta(7, 6, _delta([0], torch.zeros(1, 4)))
    assert store.versions() == [6, 7]
    assert store.load_chain().versions == [6, 7]


def test_base_shortens_chains_and_lets_retention_drop_what_precedes_it(tmp_path):
    store = SnapshotStore(str(tmp_path), keep_versions=2)
    store.publish_full(1, _full())
    for v in range(2, 5):
        store.publish_delta(v, v - 1, _delta([0], torch.full((1, 4), float(v))))
    with pytest.raises(SnapshotError, match="full already"):
        store.publish_base(1, _full())
    store.publish_base(3, _full(3))
    with pytest.raises(SnapshotError, match="already has a base"):
        store.publish_base(3, _full(3))
    assert store.latest_version() == 4
    chain = store.load_chain()
    assert chain.versions == [3, 4] and chain.from_base
    assert torch.equal(chain.full.dense["w"], _full(3).dense["w"])
    store.publish_delta(5, 4, _delta([0], torch.zeros(1, 4)))
    # 4 and 5 are kept, 3 for its base; 1 and 2 are needed by nothing now
    assert store.versions() == [3, 4, 5]
    store.verify(5)


def test_damaged_base_is_refused(tmp_path):
    store = SnapshotStore(str(tmp_path))
    store.publish_full(1, _full())
    store.publish_delta(2, 1, _delta([0], torch.zeros(1, 4)))
    store.publish_base(2, _full(2))
    path = tmp_path / "v000002" / "base" / "dense.safetensors"
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(SnapshotCorrupt, match="sha256"):
        store.load_chain(2)
    with pytest.raises(SnapshotCorrupt):
        store.verify(2)


def test_rollback_sets_latest(tmp_path):
    store = SnapshotStore(str(tmp_path))
    store.publish_full(1, _full())
    store.publish_full(2, _full(1))
    store.set_latest(1)
    assert store.latest_version() == 1
    with pytest.raises(SnapshotNotFound):
        store.set_latest(9)


def test_states_cross_processes_as_numpy_and_come_back_equal():
    from stream.snapshots.store import state_from_wire, state_to_wire

    full = _full()
    full.memories["pkm"][0]["bf"] = torch.ones(2, dtype=torch.bfloat16)  # numpy has no bf16
    wire = state_to_wire(full)
    assert isinstance(wire.dense["w"], np.ndarray) and isinstance(wire.memories["pkm"][0]["bf"], torch.Tensor)
    back = state_from_wire(wire)
    for k, v in full.dense.items():
        assert torch.equal(back.dense[k], v)
    assert torch.equal(back.memories["pkm"][0]["values"], full.memories["pkm"][0]["values"])
    assert back.memories["pkm"][1] == {"n": 10}

    delta = _delta([1, 3], torch.full((2, 4), 7.0))
    wire = state_to_wire(delta)
    assert isinstance(wire.memories["pkm"].tables["values"][1], np.ndarray)
    back = state_from_wire(wire)
    rows, vals = back.memories["pkm"].tables["values"]
    assert rows.tolist() == [1, 3] and torch.equal(vals, torch.full((2, 4), 7.0))
    assert back.memories["pkm"].ids == {"users": ["u1", "u3"]}
    assert torch.equal(back.dense["w"], delta.dense["w"])


def test_a_version_of_the_previous_format_is_refused_by_name(tmp_path):
    """Format 2 held the bank and the histories by string id; format 3 by integer key and
    row number. A format-2 version is refused with what to do, not misread."""
    from stream.snapshots.store import FORMAT_VERSION

    assert FORMAT_VERSION == 3
    store = SnapshotStore(str(tmp_path / "snaps"))
    store.publish_full(1, _full(), {})
    path = tmp_path / "snaps" / "v000001" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(SnapshotCorrupt, match="snapshot format 2, this release reads format 3"):
        store.load_chain(1)
