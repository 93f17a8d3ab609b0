"""llmlab.serving_sim: on a simulated request stream paging reserves little more than it fills,
contiguous preallocation much more; runs are seeded; parallel samples share their prompt blocks."""

from dataclasses import replace

import pytest

from llmlab.serving_sim import WorkloadConfig, simulate_workload


def test_workload_paging_wastes_little_contiguous_wastes_much():
    report = simulate_workload(WorkloadConfig(num_requests=60))
    assert report.paged_waste < 0.05
    assert report.contiguous_waste > 0.5
    assert report.filled_slot_steps <= report.paged_slot_steps <= report.contiguous_slot_steps


def test_workload_is_seeded_and_checks_its_lengths():
    assert simulate_workload(WorkloadConfig.tiny()) == simulate_workload(WorkloadConfig.tiny())
    assert simulate_workload(WorkloadConfig.tiny()) != simulate_workload(replace(WorkloadConfig.tiny(), seed=1))
    with pytest.raises(ValueError, match="max_model_len must be >= max_prompt"):
        WorkloadConfig(max_prompt=100, max_output=100, max_model_len=150)


def test_workload_parallel_samples_share_their_prompt_blocks():
    single = simulate_workload(WorkloadConfig.tiny())
    shared = simulate_workload(replace(WorkloadConfig.tiny(), samples_per_request=3))
    assert single.sharing_saving == 0.0 and single.logical_slot_steps == single.filled_slot_steps
    assert shared.sharing_saving > 0.2  # two of three prompt copies are never stored
    assert shared.paged_slot_steps < shared.logical_slot_steps < shared.contiguous_slot_steps
