"""Prometheus metrics, read from the Archiver's own counters at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from archiver.archive import Archive
from archiver.cameras import LAG_BUCKETS_S, CameraState


class ArchiverCollector(Collector):
    def __init__(self, archive: Archive) -> None:
        self._archive = archive
        self.errors: dict[str, int] = {}

    def count_error(self, status: int) -> None:
        key = str(status)
        self.errors[key] = self.errors.get(key, 0) + 1

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        archive, keys = self._archive, self._archive.keys
        yield CounterMetricFamily("fusion_ingest_bytes", "Plaintext bytes ingested",
                                  value=archive.bytes_ingested)
        yield CounterMetricFamily("fusion_ingest_segments", "Segments archived",
                                  value=archive.segments_ingested)
        yield CounterMetricFamily("fusion_key_rotations", "Minute keys created",
                                  value=keys.rotations)
        yield CounterMetricFamily("fusion_key_chains_started", "Key chains started (one per "
                                  "camera stream per day and per revocation)",
                                  value=keys.chains_started)
        yield CounterMetricFamily("fusion_wrapped_keys", "Chain records written (one per viewer "
                                  "per key chain, and one per join)",
                                  value=keys.key_records_written)
        yield CounterMetricFamily("fusion_key_chain_joins", "Viewers added to a running key "
                                  "chain (a join record each, instead of a new chain)",
                                  value=keys.joins)
        yield CounterMetricFamily("fusion_key_material_bytes", "Key material written: chain "
                                  "records, epoch openers and signed chain recipients (bytes)",
                                  value=keys.key_record_bytes + keys.opener_bytes
                                  + keys.recipients_bytes)
        yield CounterMetricFamily("fusion_epochs_started", "Epoch openers written (one RSA-OAEP "
                                  "encryption each)", value=keys.epochs_started)
        yield GaugeMetricFamily("fusion_active_viewers", "Viewers authorized and not revoked",
                                value=keys.active_viewers())
        yield from self._directory()
        yield from self._cameras()
        yield from self._retention()
        errors = CounterMetricFamily("fusion_http_errors", "HTTP error responses",
                                     labels=["status"])
        for status, count in sorted(self.errors.items()):
            errors.add_metric([status], count)
        yield errors


    def _directory(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """In a site: whether the directory answers (an outage is recorded through, under the
        last authorizations read: archiver/directory/snapshot.py). Alert on it."""
        link = self._archive.directory.link
        if link is None:
            return
        state = link.state()
        yield GaugeMetricFamily("fusion_directory_up", "1 if the site directory (PostgreSQL) "
                                "answers, 0 while it is unreachable", value=int(state.state == "ok"))
        if state.last_read_ms is not None:
            yield GaugeMetricFamily("fusion_directory_last_read_age_seconds", "Seconds since "
                                    "the site directory last answered",
                                    value=max(0, self._archive.clock() - state.last_read_ms) / 1000)
        yield CounterMetricFamily("fusion_directory_outages", "Times the site directory became "
                                  "unreachable since start", value=link.outages)

    def _cameras(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily
                                   | HistogramMetricFamily]:
        archive = self._archive
        now = archive.clock()
        state = GaugeMetricFamily("fusion_camera_state", "1 for the camera's current state",
                                  labels=["camera", "state"])
        last = GaugeMetricFamily("fusion_camera_last_segment_seconds",
                                 "Unix time the camera's last segment arrived", labels=["camera"])
        segments = GaugeMetricFamily("fusion_camera_segments_last_minute",
                                     "Segments archived in the last 60 s", labels=["camera"])
        size = GaugeMetricFamily("fusion_camera_bytes_last_minute",
                                 "Plaintext bytes archived in the last 60 s", labels=["camera"])
        gaps = CounterMetricFamily("fusion_camera_gaps", "Gaps in the recording since start",
                                   labels=["camera"])
        refused = CounterMetricFamily("fusion_camera_refused_segments",
                                      "Segments that could not be archived since start",
                                      labels=["camera"])
        jumps = CounterMetricFamily("fusion_camera_timestamp_jumps",
                                    "Segments whose timestamps jumped between two frames "
                                    "(the jump is not signed as video)", labels=["camera"])
        restarts = CounterMetricFamily("fusion_camera_puller_restarts",
                                       "Times an RTSP pull failed and was retried", labels=["camera"])
        faults = CounterMetricFamily("fusion_camera_stream_faults",
                                     "RTSP segments cut or frames dropped at the segment cap",
                                     labels=["camera"])
        lag = GaugeMetricFamily("fusion_camera_lag_seconds", "From the end of the capture of the "
                                "camera's last segment to its archiving", labels=["camera"])
        max_lag = GaugeMetricFamily("fusion_camera_max_lag_seconds", "The most any segment of "
                                    "the camera lagged (capture to archiving) in the last 60 s",
                                    labels=["camera"])
        overruns = CounterMetricFamily("fusion_camera_lag_overruns", "Pulled segments placed at "
                                       "their arrival: their clock was further behind than the "
                                       "bound", labels=["camera"])
        for camera in archive.directory.cameras():
            health = archive.health.health(camera.name, now)
            if health.lag_ms is not None:
                lag.add_metric([camera.name], health.lag_ms / 1000)
            if health.max_lag_ms is not None:
                max_lag.add_metric([camera.name], health.max_lag_ms / 1000)
            overruns.add_metric([camera.name], health.overruns)
            for value in CameraState:
                state.add_metric([camera.name, value.value], int(health.state == value))
            if health.last_segment_ms is not None:
                last.add_metric([camera.name], health.last_segment_ms / 1000)
            segments.add_metric([camera.name], health.segments_last_minute)
            size.add_metric([camera.name], health.bytes_last_minute)
            gaps.add_metric([camera.name], health.gaps)
            refused.add_metric([camera.name], health.refused)
            restarts.add_metric([camera.name], health.puller_restarts)
            faults.add_metric([camera.name], health.stream_faults)
            jumps.add_metric([camera.name], health.timestamp_jumps)
        yield from (state, last, segments, size, gaps, refused, restarts, faults, jumps, lag,
                    max_lag, overruns)
        histogram = archive.health.lag_histogram()
        buckets = [(str(bound), count) for bound, count in zip(LAG_BUCKETS_S, histogram.counts,
                                                                 strict=False)]
        buckets.append(("+Inf", histogram.counts[-1]))
        yield HistogramMetricFamily("fusion_segment_lag_seconds", "Capture-to-archive lag of "
                                    "every segment archived since start, all cameras",
                                    buckets=buckets, sum_value=histogram.sum_s)


    def _retention(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        archive = self._archive
        retention = archive.retention
        total = retention.total
        yield GaugeMetricFamily("fusion_archive_free_bytes", "Free space on the archive's file "
                                "system", value=retention.free_bytes())
        yield GaugeMetricFamily("fusion_archive_min_free_bytes", "Below this free space the "
                                "oldest unheld video is removed", value=archive.settings.min_free_bytes)
        yield GaugeMetricFamily("fusion_archive_below_watermark", "1 if free space is below the "
                                "threshold with no unheld video of a past day left to remove",
                                value=int(total.below_watermark))
        yield CounterMetricFamily("fusion_retention_files_removed", "Archive days removed "
                                  "(retention or disk space)", value=total.files_removed)
        yield CounterMetricFamily("fusion_retention_bytes_reclaimed", "Bytes of archive files "
                                  "and key journals removed", value=total.bytes_reclaimed)
        yield CounterMetricFamily("fusion_retention_key_records_shredded", "Key records "
                                  "destroyed (crypto-shredding)", value=total.key_records_shredded)
        last = retention.last_pass
        if last is not None:
            yield GaugeMetricFamily("fusion_retention_last_pass_seconds", "Duration of the last "
                                    "retention pass", value=last.seconds)
        days = GaugeMetricFamily("fusion_camera_retention_days", "Days the camera's video is kept",
                                 labels=["camera"])
        oldest = GaugeMetricFamily("fusion_camera_oldest_video_seconds", "Unix time of the start "
                                   "of the camera's oldest archived video", labels=["camera"])
        for camera in archive.directory.cameras():
            days.add_metric([camera.name], camera.retention_days or archive.settings.retention_days)
            recorded = archive.db.recorded_range(camera.name)
            if recorded is not None:
                oldest.add_metric([camera.name], recorded[0] / 1000)
        yield from (days, oldest)


def make_registry(collector: ArchiverCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return registry


class LeaseCollector(Collector):
    """Failover (issue 22): this Archiver's camera leases, from ``status``
    (SiteMember.lease_status)."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        status = self._status()
        if not status["failover"]:
            return  # a site of one (SQLite directory): no leases
        yield GaugeMetricFamily("fusion_site_leases_held", "Cameras with standbys this "
                                "Archiver records (it holds their lease)",
                                value=len(status["leases_held"]))
        yield GaugeMetricFamily("fusion_site_lease_locks_held", "Of those, the cameras whose "
                                "lease lock it holds (fewer: its lock session to PostgreSQL is "
                                "down, its standbys may take over)",
                                value=len(status["leases_locked"]))
        yield GaugeMetricFamily("fusion_site_standby_cameras", "Cameras this Archiver stands "
                                "by for (takes over when their Archiver is gone)",
                                value=len(status["standby_for"]))
        yield CounterMetricFamily("fusion_site_takeovers", "Cameras this Archiver took over "
                                  "from a dead or unreachable one since it started",
                                  value=status["takeovers"])
        yield CounterMetricFamily("fusion_site_leases_lost", "Cameras taken from this Archiver "
                                  "while it could not reach the directory (it recorded on, "
                                  "then ended its stream)", value=status["leases_lost"])
        yield GaugeMetricFamily("fusion_site_storage_failing", "1 while this Archiver's own "
                                "disk fails (it gave its cameras with standbys to them and "
                                "takes none over)", value=int(status["storage"] != "ok"))
        yield CounterMetricFamily("fusion_site_storage_releases", "Cameras this Archiver gave "
                                  "to a standby because its disk could not archive them",
                                  value=status["storage_releases"])
