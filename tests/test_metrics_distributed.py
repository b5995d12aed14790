"""OODMetricAccumulator under torchrun (2 CPU processes, gloo) gathers every process's scores before computing.

The test launches this file as a torchrun script (``python -m torch.distributed.run --standalone
--nproc_per_node=2 tests/test_metrics_distributed.py OUT``). The two processes hold shards of different sizes,
and one of them holds no OOD scores at all; both must compute the metrics of the whole set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from dreamood.evaluation import OODMetricAccumulator, ood_metrics


def _all_scores() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    id_scores = torch.randint(0, 8, (23,), generator=generator).to(torch.float64)  # ties across the shards
    ood_scores = torch.randint(-4, 5, (17,), generator=generator).to(torch.float64)
    return id_scores, ood_scores


def _worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    id_scores, ood_scores = _all_scores()
    accumulator = OODMetricAccumulator(fpr_rule="nearest")
    id_shard = id_scores[:15] if rank == 0 else id_scores[15:]
    for batch in id_shard.split(4):
        accumulator.update(id_scores=batch)
    if rank == 1:  # rank 0 sees no OOD sample
        accumulator.update(ood_scores=ood_scores[:9])
        accumulator.update(ood_scores=ood_scores[9:])
    gathered = accumulator.compute()
    local = OODMetricAccumulator(sync_on_compute=False)
    local.update(id_scores=id_shard, ood_scores=ood_scores[:5])
    result = {"gathered": asdict(gathered), "local_n_id": local.compute().n_id}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_compute_the_metrics_of_all_scores(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([*command, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    id_scores, ood_scores = _all_scores()
    expected = asdict(ood_metrics(id_scores, ood_scores, fpr_rule="nearest"))
    for rank, local_n_id in ((0, 15), (1, 8)):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["gathered"] == expected
        assert result["local_n_id"] == local_n_id  # sync_on_compute=False keeps the shard


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
