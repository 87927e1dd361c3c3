"""k-means router initialisation in real training runs: the same router whatever the
process count, written into the checkpoint, and not redone on a resume."""
import re

from trainrun import SMALL, explain, run

KMEANS = SMALL + ["--router_init", "kmeans", "--max_steps", "2", "--save_every", "2"]


def router_digest(done) -> str:
    found = re.findall(r"router initialised from k-means of (\d+) routing units.*router sha256 (\w+)", done.stderr)
    assert len(found) == 1, explain(done)
    return found[0]


def test_kmeans_init_is_the_same_on_one_and_two_processes_and_not_redone_on_resume(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    first = run("single", KMEANS + ["--output_dir", str(one)], tmp_path)
    assert first.returncode == 0, explain(first)
    second = run("ddp2", KMEANS + ["--output_dir", str(two)], tmp_path)
    assert second.returncode == 0, explain(second)
    units, digest = router_digest(first)
    assert int(units) > 0 and router_digest(second) == (units, digest)
    resumed = run("single", KMEANS + ["--output_dir", str(one), "--max_steps", "3", "--resume_from_checkpoint",
                                      "auto"], tmp_path)
    assert resumed.returncode == 0, explain(resumed)
    assert "k-means" not in resumed.stderr  # the checkpoint's router, not a new clustering
