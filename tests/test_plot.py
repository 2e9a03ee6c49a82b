"""utils.plot reads a resumed run's metrics with one continuing clock."""
import json

from utils.plot import read


def test_a_resumed_runs_clock_continues(tmp_path):
    times = [10.0, 70.0, 130.0, 5.0, 65.0]  # 3 rows, then a resumed process whose clock starts again
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "time": t}) + "\n"
                                                    for i, t in enumerate(times)) + "\n")
    assert [r["time"] for r in read(tmp_path)] == [10.0, 70.0, 130.0, 135.0, 195.0]
    assert [r["step"] for r in read(tmp_path)] == [0, 1, 2, 3, 4]


def test_done_line_gives_the_change_with_its_standard_error():
    from utils.tracking import accuracy_change

    # 0.63 -> 0.85 on 100 questions: SE = sqrt(0.63 * 0.37 / 100 + 0.85 * 0.15 / 100) = sqrt(0.003606) = 0.0601
    line = accuracy_change(0.63, 0.85, 100)
    assert line == "change +0.220, standard error 0.060 over 100 questions: beyond noise (2 SE = 0.120)"
    # 0.10 -> 0.08 on 50: SE = sqrt(0.0018 + 0.001472) = 0.0572; |-0.02| < 2 SE
    assert accuracy_change(0.10, 0.08, 50) == "change -0.020, standard error 0.057 over 50 questions: within noise (2 SE = 0.114)"
    assert accuracy_change(0.5, 0.5, None) == "change +0.000"  # an old run without eval/questions
