"""utils.plot reads a resumed run's metrics with one continuing clock."""
import json

from utils.plot import read


def test_a_resumed_runs_clock_continues(tmp_path):
    times = [10.0, 70.0, 130.0, 5.0, 65.0]  # 3 rows, then a resumed process whose clock starts again
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "time": t}) + "\n"
                                                    for i, t in enumerate(times)) + "\n")
    assert [r["time"] for r in read(tmp_path)] == [10.0, 70.0, 130.0, 135.0, 195.0]
    assert [r["step"] for r in read(tmp_path)] == [0, 1, 2, 3, 4]
