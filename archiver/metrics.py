"""Prometheus metrics, read from the Archiver's own counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from archiver.archive import Archive


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
        yield CounterMetricFamily("fusion_wrapped_keys", "Key records written (one per viewer "
                                  "per minute key)", value=keys.key_records_written)
        yield CounterMetricFamily("fusion_epochs_started", "Epoch openers written (one RSA-OAEP "
                                  "encryption each)", value=keys.epochs_started)
        yield GaugeMetricFamily("fusion_active_viewers", "Viewers authorized and not revoked",
                                value=keys.active_viewers())
        errors = CounterMetricFamily("fusion_http_errors", "HTTP error responses",
                                     labels=["status"])
        for status, count in sorted(self.errors.items()):
            errors.add_metric([status], count)
        yield errors


def make_registry(collector: ArchiverCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return registry
