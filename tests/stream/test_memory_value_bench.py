"""benchmarks/memory_value.py: its pure logic (selections, overrides, tables) and one
tiny end-to-end run over a 400-event stress stream."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import memory_value as mv  # noqa: E402
from stream.config import load_config  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def test_selections_are_checked_and_keep_their_order():
    assert mv.parse_list("with-pkm, default", list(mv.VARIANTS), "variants") == ["with-pkm", "default"]
    with pytest.raises(mv.BenchError, match="--variants: unknown \\['no-bnak'\\]; known: default,"):
        mv.parse_list("default,no-bnak", list(mv.VARIANTS), "variants")
    with pytest.raises(mv.BenchError, match="empty selection"):
        mv.parse_list(" , ", mv.DEFAULT_STREAMS, "streams")
    assert set(mv.DEFAULT_STREAMS) == {"ml-100k", "ml-1m", *mv.STRESS}


def test_every_variant_is_a_valid_config_and_switches_what_it_names():
    for name in mv.VARIANTS:
        model = load_config(None, mv.variant_overrides(name, [])).model
        assert model.use_bank == (not name.startswith(mv.ALL_OFF))  # the only memory on by default
        assert model.use_lmn == (name.startswith("with-lmn") or name == mv.ALL_ON)
        assert model.use_pkm == (name in ("with-pkm", mv.ALL_ON))
        assert model.features.use_word_affinity == ("affinity" not in name)
    # The variant's switches come after the global --set: they win on the same key.
    sets = mv.variant_overrides("with-pkm", ["model.use_pkm=false", "trainer.batch_size=64"])
    assert load_config(None, sets).model.use_pkm is True
    assert load_config(None, sets).trainer.batch_size == 64
    curve = load_config(None, mv.pkm_overrides(64, ["model.use_pkm=false"])).model
    assert curve.use_pkm and curve.pkm.n_sub_keys == 64


def test_the_long_taste_stream_reads_the_window_it_is_built_for():
    from stream.recordings.data.stress import HISTORY_L

    assert mv.stream_overrides("ml-1m") == [] and mv.stream_overrides("stress-capacity") == []
    for key in ("stress-long-taste", "stress-long-taste, run 2"):  # an assembled table's key too
        assert mv.stream_overrides(key) == [f"model.history.length={HISTORY_L}"]
    sets = mv.variant_overrides("all-off", mv.stream_overrides("stress-long-taste"))
    assert load_config(None, sets).model.history.length == HISTORY_L
    # a --set given for the run still wins
    later = [*mv.stream_overrides("stress-long-taste"), "model.history.length=7"]
    assert load_config(None, mv.variant_overrides("default", later)).model.history.length == 7
    table = "\n".join(
        mv.stream_table("stress-long-taste", Path("r.parquet"), [mv.Row("default", [], _report(0.7, 9.0))])
    )
    assert f"model.history.length={HISTORY_L}" in table


def _report(auc: float, eps: float, slices: bool = True) -> dict:
    buckets = {b: {"n": 10, "auc.like": auc, "logloss.like": 0.6} for b in ("0", "1-4", "5-49", "50+")}
    return {
        "events_trained": 40,
        "auc.like": auc,
        "logloss.like": 0.61,
        "throughput_eps": eps,
        "slices": {
            "item_evidence": buckets,
            "user_evidence": {**buckets, "50+": {"n": 0, "auc.like": None, "logloss.like": None}},
            "user_history": {"short": buckets["0"], "long": buckets["1-4"]},
        }
        if slices
        else None,
    }


def test_stream_table_rows_slices_and_speed_ratio():
    rows = [
        mv.Row("default", [], _report(0.7, 1000.0)),
        mv.Row(mv.ALL_OFF, mv.VARIANTS[mv.ALL_OFF], _report(0.6, 4000.0)),
        mv.Row(mv.RIVER, [], _report(0.65, 40000.0)),
    ]
    lines = mv.stream_table("stress-x", Path("x.parquet"), rows)
    header = next(line for line in lines if line.startswith("| variant"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:5] == ["variant", "--set", "events", "AUC", "item 0"] and cols[-3:] == [
        "logloss",
        "events/s",
        "x all-off",
    ]
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| variant")]
    default, all_off, river = ([c.strip() for c in r.strip("|").split("|")] for r in table)
    assert len(default) == len(cols)
    assert default[0] == "default" and default[3] == "0.7000" and default[-1] == "0.25"
    assert all_off[1] == "model.use_bank=false model.use_lmn=false model.use_pkm=false"
    assert all_off[-1] == "1.00" and river[0].startswith("River LR SGD(0.05)") and river[-1] == "10.00"
    assert default[cols.index("user 50+")] == "-"  # an empty bucket has no AUC
    assert any(line.startswith("Events per slice: item 0 10,") for line in lines)
    # Without an all-off row there is no ratio; without slices the columns say so.
    lone = mv.stream_table("s", Path("x"), [mv.Row("default", [], _report(0.7, 1.0, slices=False))])
    assert lone[-4].strip().startswith("(this build's report has no `slices`")
    assert mv.speed_ratio(rows[0], rows[:1]) is None


def test_curve_table_reads_the_pkm_stats():
    rep = _report(0.7, 900.0)
    rep.update(
        {
            "auc_last20.like": 0.72,
            "pkm.slot_usage": 0.5,
            "pkm.slot_usage_window": 0.2,
            "pkm.kl_uniform": 1.25,
            "memories": {"pkm": {"cumulative": {"dead_slots": 2048}}},
        }
    )
    lines = mv.curve_table(
        "stress-capacity", Path("c"), [mv.Row("n_sub_keys=64", ["model.pkm.n_sub_keys=64"], rep)]
    )
    row = [c.strip() for c in lines[-2].strip("|").split("|")]
    assert row == ["64", "4,096", "0.7000", "0.7200", "0.6100", "900", "0.500", "0.200", "1.25", "2048"]


def test_a_tiny_run_end_to_end_and_assembled(tmp_path):
    from stream.recordings.data.stress import build_stress_recording

    build_stress_recording("stress-cold-items", tmp_path / "stress-cold-items-seed0.parquet", events=400)
    out = tmp_path / "mv.md"
    args = [
        "--streams",
        "stress-cold-items",
        "--variants",
        "all-off",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(out),
        "--set",
        "trainer.batch_size=64",
        "--note",
        "a tiny run",
        "--commit",
        "abc123",
    ]
    assert mv.main(args) == 0
    text = out.read_text()
    assert "Commit: abc123;" in text and "a tiny run" in text and "## stress-cold-items" in text
    assert "| all-off |" in text and "| River LR SGD(0.05) (peer) |" in text
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["streams"]["stress-cold-items"]["rows"]
    assert [r["name"] for r in rows] == ["all-off", "river", "oracle"]
    assert "| oracle: the true P(like) |" in text
    # The oracle (the generator's true P(like)) is sliced by the same evidence as the model.
    model_n, oracle_n = (
        {s: {b: v["n"] for b, v in bs.items()} for s, bs in r["report"]["slices"].items()}
        for r in (rows[0], rows[2])
    )
    assert model_n == oracle_n and rows[2]["report"]["auc.like"] > 0.8
    assert rows[0]["report"]["events_trained"] == 400 and "config" not in rows[0]["report"]
    assert rows[1]["report"]["slices"]["item_evidence"]["0"]["n"] > 0  # River's own slices
    assert sum(b["n"] for b in rows[0]["report"]["slices"]["item_evidence"].values()) == 400

    again = tmp_path / "again.md"
    part = str(out.with_suffix(".json"))
    assert mv.main(["--assemble", f"{part},{part}", "--out", str(again), "--commit", "abc123"]) == 0
    text = again.read_text()
    assert text.count("| all-off |") == 2 and "## stress-cold-items, run 2" in text
    streams = json.loads(again.with_suffix(".json").read_text())["streams"]
    assert list(streams) == ["stress-cold-items", "stress-cold-items, run 2"]
