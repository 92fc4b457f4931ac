"""parallel.run_on_hosts: several ranks work at once while the others wait outside any collective; every rank gets
every host's result in host order; a host's failure reaches every rank, naming the host. Real gloo processes."""

from __future__ import annotations

import json
import time

from megatron_harness import spawn


def _worker(rank: int, out_dir: str) -> None:
    from mssr_megatron.parallel import destroy_megatron, init_megatron, run_on_hosts

    init_megatron(backend="gloo", device="cpu")
    out: dict = {}
    start = time.perf_counter()
    out["shared"] = run_on_hosts(lambda: (time.sleep(0.5 * (rank + 1)), f"from {rank}")[1], [2, 0], "work")
    out["waited"] = time.perf_counter() - start
    out["own"] = run_on_hosts(lambda: f"kept by {rank}", [0, 2], "engine start-up", share=False)

    def fail_on_2():
        if rank == 2:
            raise ValueError("bad answer")
        return rank

    try:
        run_on_hosts(fail_on_2, [0, 2], "reward grading")
    except (RuntimeError, ValueError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    destroy_megatron()


def test_hosts_work_together_and_every_rank_gets_their_results_in_host_order(tmp_path):
    spawn(_worker, 3, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for rank, result in enumerate(results):
        assert result["shared"] == ["from 2", "from 0"]
        assert result["waited"] >= 1.5  # everyone waited for the slower host (rank 2: 1.5 s)
        assert result["own"] == (f"kept by {rank}" if rank in (0, 2) else None)
    assert results[2]["error"] == "ValueError: bad answer"
    for rank in (0, 1):
        assert results[rank]["error"] == ("RuntimeError: rank 2 failed: ValueError: bad answer (during reward "
                                          "grading); this rank stops too")
