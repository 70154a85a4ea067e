"""The fault corpus of issue 26: every case the hostile-user probe found, with the tests that
reproduce it on a tiny study (the fixtures of tests/conftest.py and tests/studies.py) and
check the fix.

:data:`CASES` lists each case of the issue (its section and words) with those tests as
pytest node ids relative to tests/. The tests live next to the code they cover; this module
refers to them instead of repeating them, checks that every case has a test and that each
named test exists, and tests/faults/conftest.py marks them ``faults``:

    python3 -m pytest -q -m faults      # the corpus alone (from the project root)

CI's ``python3 -m pytest -q`` runs them with the rest of the suite.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

CASES: dict[str, tuple[str, ...]] = {
    # Silent wrong results
    "labels whose ids do not match the truth (ids shifted, half missing) scored on the matching subset": (
        "test_evaluate.py::test_ids_must_match_the_truth_one_to_one",
        "test_stages_evaluate.py::test_a_missing_or_extra_building_names_the_file_and_writes_nothing",
    ),
    "metrics record no count of the scored buildings and vertices": (
        "test_stages_evaluate.py::test_a_uniform_shift_scores_its_length_at_every_vertex",
    ),
    "extra label buildings ignored without a word": (
        "test_evaluate.py::test_ids_must_match_the_truth_one_to_one",
        "test_stages_evaluate.py::test_a_missing_or_extra_building_names_the_file_and_writes_nothing",
    ),
    "two swapped ids (same vertex count) pass unnoticed": (
        "test_evaluate.py::test_swapped_ids_are_refused",
        "test_evaluate.py::test_honest_noise_in_a_dense_block_is_not_taken_for_a_swap",
        "test_stages_evaluate.py::test_swapped_ids_are_refused",
    ),
    "round removed from rounds and noise.seed changed: labels of the previous study feed the next stages": (
        "test_provenance.py::test_a_round_removed_from_the_study_cannot_feed_the_next",
        "test_provenance.py::test_evaluate_refuses_labels_of_another_study",
        "test_provenance.py::test_each_changed_key_is_named_with_both_values",
        "test_provenance.py::test_stage_params_are_those_dvc_yaml_lists",
    ),
    "truth polygons with a wrongly declared CRS: the tile silently leaves the study": (
        "test_input_validation.py::test_polygons_with_a_wrongly_declared_crs_are_refused_naming_both_crss",
        "test_stages_misalign.py::test_a_tile_whose_polygons_all_fall_outside_is_refused",
    ),
    "labels outside the tile are scored without a warning": (
        "test_evaluate.py::test_labels_outside_their_tile_are_refused",
    ),
    "zero-area, point and empty truth geometries dropped at INFO level": (
        "test_input_validation.py::test_dropped_truth_geometries_are_a_warning_with_counts",
    ),
    "noise.max_displacement: .inf and train.optim.lr: .nan pass validation": (
        "test_config.py::test_numbers_must_be_finite",
    ),
    "a NaN label coordinate passes train and realign and is written into the next round's labels": (
        "test_input_validation.py::test_nan_coordinates_in_a_polygon_file_are_refused",
        "test_input_validation.py::test_misalign_refuses_to_write_non_finite_labels",
        "test_input_validation.py::test_realign_refuses_to_write_non_finite_labels",
    ),
    "misspelled extra sections (nosie:) are ignored": (
        "test_config.py::test_unknown_sections_are_refused",
    ),
    "a duplicate key silently takes the last value": (
        "test_config.py::test_duplicate_keys_are_named_with_their_line",
    ),
    # Lost or damaged
    "a rerun with complete checkpoints rewrites the training log as a header only": (
        "test_stages_train.py::test_rerun_resumes_from_checkpoints",
    ),
    "a resumed run keeps only the log rows after the resume": (
        "test_stages_train.py::test_a_killed_stage_reruns_to_the_models_and_log_of_an_uninterrupted_one",
    ),
    "uncached outputs (metrics, curves, figures) removed by DVC before a stage runs are lost": (
        "test_outputs_kept.py::test_every_uncached_output_is_tracked_by_git",
        "test_outputs_kept.py::test_git_keeps_no_stale_result_under_data",
    ),
    "resume is not exact: a killed and rerun training ends with other weights": (
        "test_resume.py::test_a_resumed_stream_yields_the_batches_the_loader_would_have",
        "test_resume.py::test_a_killed_training_resumes_to_the_bytes_of_an_uninterrupted_one",
        "test_stages_train.py::test_a_killed_stage_reruns_to_the_models_and_log_of_an_uninterrupted_one",
    ),
    "a cosmetic key (log_every, num_workers, checkpoint_every) deletes the checkpoint": (
        "test_stages_train.py::test_cosmetic_settings_keep_the_checkpoints",
    ),
    "a truncated or empty checkpoint or model fails with a bare OSError/EOFError/KeyError naming no file": (
        "test_resume.py::test_a_corrupt_model_file_is_named",
        "test_resume.py::test_a_model_file_without_weights_is_named",
        "test_resume.py::test_a_corrupt_checkpoint_is_moved_aside_and_the_previous_one_resumed",
        "test_resume.py::test_two_corrupt_checkpoints_start_afresh",
        "test_resume.py::test_a_checkpoint_without_a_step_is_named",
    ),
    "replacing a directory output deletes the old one before renaming the new one": (
        "test_atomic.py::test_failed_rename_of_the_new_directory_keeps_the_old_one",
        "test_atomic.py::test_a_kill_between_the_renames_loses_nothing",
        "test_atomic.py::test_a_failed_delete_of_the_old_directory_keeps_the_new_one",
    ),
    # Not reproducible across machines
    "the synthetic city renders differently on another CPU (SIMD-dependent float paths)": (
        "test_sources_synthetic.py::test_tiles_do_not_depend_on_the_cpus_simd_kernels",
        "test_sources_synthetic.py::test_small_tile_md5_is_pinned",
    ),
    # Confusing
    "lr: 1e-3 rejected as a string while DVC reads it as a number": (
        "test_config.py::test_numbers_are_read_as_dvc_reads_them",
    ),
    "an unknown city source under dvc repro shows only DVC's \"Parameters 'osm' are missing\"": (
        "test_input_validation.py::test_an_unknown_source_is_named_with_the_key",
        "test_input_validation.py::test_dvc_repro_names_the_unknown_source_before_dvc_does",
    ),
    "a full disk during a GeoPackage write reports \"no such table: gpkg_contents\"": (
        "test_disk_full.py::test_geopackage_reports_the_full_disk_not_gpkg_contents",
        "test_disk_full.py::test_the_same_failure_with_free_space_is_not_called_a_full_disk",
        "test_disk_full.py::test_json_and_text",
        "test_disk_full.py::test_geotiff",
        "test_disk_full.py::test_figure_network_and_manifest",
        "test_disk_full.py::test_a_nested_write_is_named_once",
    ),
    "the NaN-loss message promises a checkpoint that does not exist": (
        "test_train.py::test_non_finite_loss_stops_without_model_file",
    ),
    "stages killed mid-run stay RUNNING in MLflow": (
        "test_stages_summarize.py::test_a_stage_run_left_running_by_a_kill_is_marked_killed_on_the_next_start",
    ),
}
"""Each case of issue 26 -> the tests that cover it (node ids relative to tests/)."""

PENDING: dict[str, str] = {}
"""Cases whose fix (and test) is not in the tree yet, with why; the corpus test names them."""


def _defined_tests(module: Path) -> set[str]:
    """The test functions (``name``) and test methods (``Class::name``) a test module defines."""
    tree = ast.parse(module.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test")}
    return names


def node_ids() -> set[str]:
    """Every test the corpus names."""
    return {test for tests in CASES.values() for test in tests}


def test_every_named_test_exists() -> None:
    missing = []
    for test in sorted(node_ids()):
        module, _, name = test.partition("::")
        path = TESTS / module
        if not path.is_file() or name not in _defined_tests(path):
            missing.append(test)
    assert not missing, f"tests named in CASES that do not exist: {missing}"


def test_every_case_of_the_issue_has_a_test() -> None:
    uncovered = sorted(case for case, tests in CASES.items() if not tests and case not in PENDING)
    assert not uncovered, f"cases of issue 26 without a test: {uncovered}"
    assert set(PENDING) <= set(CASES)
    covered_yet_pending = sorted(case for case in PENDING if CASES[case])
    assert not covered_yet_pending, f"cases with a test still listed in PENDING: {covered_yet_pending}"


def test_the_named_tests_are_marked_faults(request: pytest.FixtureRequest) -> None:
    """The marker that `pytest -m faults` selects is on every named test collected with this one."""
    items = {item.nodeid.split("[")[0]: item for item in request.session.items}
    prefix = f"{TESTS.name}/"
    collected = [items[prefix + t] for t in node_ids() if prefix + t in items]
    if not collected:
        pytest.skip("run with the whole suite (python3 -m pytest -m faults) to see the marks")
    unmarked = [item.nodeid for item in collected if item.get_closest_marker("faults") is None]
    assert not unmarked
    assert request.node.get_closest_marker("faults") is not None
