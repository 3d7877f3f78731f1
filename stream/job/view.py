"""The admin API's view of a running job (stream/admin/app.py's JobView), over the actors."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stream.job.driver import Topology
    from stream.job.metrics import JobMetrics


class DriverJobView:
    """Each question asked of the actor that knows (trainer: memories; publisher: versions)."""

    def __init__(self, topo: Topology, metrics: JobMetrics):
        self.t = topo
        self.metrics = metrics

    def _get(self, ref, timeout: float = 15.0):
        import ray

        return ray.get(ref, timeout=timeout)

    def bank_item(self, item_id):
        return self._get(self.t.trainer.bank_item.remote(item_id))

    def bank_neighbors(self, item_id, k):
        return self._get(self.t.trainer.bank_neighbors.remote(item_id, k))

    def trainer_health(self):
        return self._get(self.t.trainer.health.remote())

    def memory_stats(self, name):
        return self._get(self.t.trainer.memory_stats.remote(name))

    def user_history(self, user_id, limit):
        return self._get(self.t.trainer.user_history.remote(user_id, limit))

    def snapshots(self):
        return self._get(self.t.publisher.snapshots.remote())

    def rollback(self, version):
        from stream.admin.app import NotFound
        from stream.snapshots.store import SnapshotError

        try:
            return self._get(self.t.publisher.pin.remote(version))
        except Exception as e:  # ray wraps the actor's exception
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, SnapshotError) or "Snapshot" in type(cause).__name__:
                raise NotFound(f"version {version} cannot be served: {cause}") from None
            raise

    def unpin(self):
        return self._get(self.t.publisher.pin.remote(None))

    def serving(self):
        return self._get(self.t.publisher.serving_state.remote())

    def ingest_lag(self):
        import ray

        ends: dict[int, int] = {}
        # All readers at once, one timeout: the driver's progress loop calls this, and one
        # reader waiting on the broker must not hold it for 15 s per reader.
        for part in ray.get([r.end_offsets.remote() for r in self.t.readers], timeout=15):
            ends.update(part)
        nxt = self._get(self.t.trainer.progress.remote()).next_offsets
        per = {p: max(0, e - int(nxt.get(p, 0))) for p, e in sorted(ends.items())}
        return {
            "topic": self.t.topic,
            "total": sum(per.values()),
            "partitions": {
                str(p): {"end": ends[p], "next": int(nxt.get(p, 0)), "lag": lag} for p, lag in per.items()
            },
        }

    def metrics_text(self):
        return self.metrics.render()
