"""Test-session plugins. SoftHSM, viewer, Archiver and camera fixtures: the fusion_testkit plugin
(fusion_testkit/pytest_plugin.py, also registered by the installed package's pytest11 entry
point; listed here so a checkout on PYTHONPATH gets it too). TPM: tests/fixtures/tokens.py."""

from __future__ import annotations

import compileall
import os
from pathlib import Path

import pytest

from fusion_testkit.forkserver import fork_commands

pytest_plugins = ["fusion_testkit.pytest_plugin", "tests.fixtures.tokens", "tests.fixtures.server",
                  "tests.fixtures.rtsp", "tests.fixtures.piv.stack", "tests.fixtures.parallel"]


def pytest_configure(config: pytest.Config) -> None:
    """The bytecode of the packages the suite runs in subprocesses (hundreds of Archivers and
    CLI commands), compiled once per session: where PYTHONDONTWRITEBYTECODE is set, Python does
    not cache it, and every process compiled every module it imports again (an Archiver's start
    ~0.2 s of CPU more, a fusion-client command ~0.1 s; issue 23). Up-to-date files are kept;
    the files are written atomically, so xdist workers may do this at once."""
    root = Path(__file__).resolve().parents[1]
    for package in ("keyservice", "archiver", "client", "fusion_testkit"):
        compileall.compile_dir(root / package, quiet=2)
    # Archivers and commands forked from a pre-imported interpreter (fusion_testkit/
    # forkserver.py): an Archiver's start costs ~0.35 s of CPU instead of ~1.4 s, a command a
    # fraction of its ~0.2 s, and the suite runs ~250 and ~1000 of them on two cores.
    # FUSION_TEST_FORK=0 runs each as a plain subprocess.
    fork_commands(os.environ.get("FUSION_TEST_FORK", "1") != "0")


# The longest tests that are not in an xdist group (those run first anyway: --dist loadgroup
# hands out the largest groups first), longest first, from the suite's --durations. Under xdist
# they start before the other single tests, so that none of them starts last and keeps one
# worker busy while the others have finished (xdist does not order by duration; without this,
# collection order put the ~20 s plugin and API-reference tests at the very end). A renamed
# test merely loses its place here.
SLOW_FIRST = (
    # The API attacks: schemathesis as five commands, one per role, then every credential.
    "tests/hardening/test_api_attack.py::test_schemathesis_finds_no_server_error_for_any_role",
    "tests/hardening/test_api_attack.py::test_every_endpoint_refuses_every_wrong_credential",
    "tests/archiver/test_overload.py::test_a_camera_that_falls_behind_keeps_its_capture_times",
    "tests/client/test_join.py::test_a_live_viewer_watching_when_it_joins_gets_its_join_",
    "tests/client/test_segment_time.py::test_a_timestamp_jump_after_an_outage_leaves_",
    "tests/archiver/test_camera_push.py::test_segment_time_is_the_span_of_its_video_",
    "tests/client/test_evidence_trust.py::test_a_package_cut_at_either_end_is_reported_partial",
    "tests/test_testkit_plugin.py::test_the_documented_example_passes_in_a_separate_project",
    "tests/test_api_docs.py::test_the_api_reference_builds",
    "tests/archiver/test_rtsp.py::test_outage_is_recorded_as_a_gap_and_the_pull_resumes",
    "tests/archiver/test_rtsp_workers.py::test_a_killed_worker_is_restarted_and_its_cameras_",
    "tests/client/test_e2e.py::test_playback_across_a_camera_outage_reports_the_gap",
    "tests/bench/test_bench_smoke.py::test_ingest_windows",
    "tests/bench/test_bench_smoke.py::test_ingest_revocation_windows",
    "tests/archiver/test_rtsp_workers.py::test_a_camera_that_goes_silent_is_reported_and_",
    "tests/archiver/test_camera_unit.py::test_the_forwarder_pushes_only_to_an_archiver_it_",
    "tests/bench/test_bench_smoke.py::test_viewer",
    "tests/archiver/test_camera_unit.py::test_a_supervised_camera_resumes_after_an_archiver_",
    "tests/archiver/test_retention.py::test_sigkill_during_retention_leaves_a_consistent_",
    "tests/client/test_grants.py::test_grant_plays_exactly_its_range_and_not_a_minute_more",
    "tests/archiver/test_certificates.py::test_an_expired_viewer_is_refused_everywhere_and_",
    "tests/archiver/test_rtsp_hostile.py::test_hostile_rtsp_cameras_are_bounded_flagged_",
    "tests/client/test_live_edges.py::test_a_relay_holding_the_live_request_back_skips_",
    "tests/archiver/test_rtsp_workers.py::test_cameras_pulled_by_worker_processes_are_",
    "tests/client/test_evidence.py::test_package_verifies_offline_by_command_and_by_hand_",
    # Long on a loaded machine (a run at load 10-17): CPU-heavy, or PostgreSQL and two Archivers.
    "tests/bench/test_startup_bench.py::test_startup_benchmark_runs_every_command",
    "tests/archiver/test_deploy.py::test_a_backup_taken_while_ingesting_restores_and_verifies",
    "tests/archiver/test_site_directory.py::test_an_archiver_with_a_postgresql_directory_",
    "tests/archiver/test_site_directory.py::test_a_directory_that_goes_away_is_a_503_",
    "tests/archiver/test_reindex.py::test_reindex_rebuilds_the_index_from_the_files",
    # The site (issue 21): PostgreSQL and two or three Archivers each.
    "tests/test_site_demo.py::test_the_site_demo_runs_from_start_to_end_and_cleans_up",
    "tests/archiver/test_site_admin.py::test_cameras_move_stops_the_old_archiver_and_starts_",
    "tests/archiver/test_site_propagation.py::test_a_revocation_through_one_archiver_ends_",
    "tests/archiver/test_directory_outage.py::test_a_directory_outage_loses_nothing_",
    "tests/bench/test_site_directory_bench.py::test_the_site_directory_bench_measures_",
    # Failover (issue 22): PostgreSQL, three Archivers and an RTSP camera; two kills.
    "tests/archiver/test_failover.py::test_kill_9_of_the_primary_the_first_standby_takes_",
    "tests/bench/test_failover_bench.py::test_the_failover_bench_kills_the_holder_",
    "tests/archiver/test_redundant.py::test_both_copies_record_and_a_gap_in_one_is_filled_",
    "tests/client/test_across.py::test_evidence_and_grants_of_a_range_across_a_move_each_",
    # Consolidation (issue 22): PostgreSQL, two Archivers restarted three times, ffmpeg.
    "tests/archiver/test_consolidation.py::test_a_returning_archiver_fills_its_gap_from_",
    # A disk fails (issue 22): PostgreSQL, two Archivers, an RTSP camera, a kill.
    "tests/archiver/test_diskfail.py::test_a_holder_whose_disk_fills_gives_its_cameras_",
)


def _slow_rank(item: pytest.Item) -> int:
    if item.get_closest_marker("xdist_group") is None:
        for rank, prefix in enumerate(SLOW_FIRST):
            if item.nodeid.startswith(prefix):
                return rank
    return len(SLOW_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On xdist workers only (every worker sorts alike, as xdist requires): the SLOW_FIRST
    tests first, in their order; the rest keep collection order (a stable sort). A serial run
    keeps collection order, so that module fixtures are not set up twice."""
    if hasattr(config, "workerinput"):
        items.sort(key=_slow_rank)


@pytest.fixture(autouse=True)
def _softhsm_for_commands(request: pytest.FixtureRequest) -> None:
    """Our tests run fusion-keys, fusion-client and pkcs11-tool as commands that inherit the
    environment: a test that uses a SoftHSM store gets its SOFTHSM2_CONF there, for that test
    only (softhsm_environ restores it). Tests that use no SoftHSM token get nothing, and the
    plugin itself sets nothing."""
    if "softhsm_store" in request.fixturenames:
        request.getfixturevalue("softhsm_environ")
