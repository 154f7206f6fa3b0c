"""bench/time_to_quality.py: the 'time to the teacher's FID' rule."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("ttq", Path(__file__).resolve().parents[1] / "bench" / "time_to_quality.py")
ttq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ttq)


def test_first_checkpoint_at_or_below_the_target_wins():
    curve = [{"step": 100, "wall_s": 60, "fid": 3.0}, {"step": 200, "wall_s": 120, "fid": 0.5},
             {"step": 300, "wall_s": 180, "fid": 0.4}]
    assert ttq.first_reaching(curve, "fid", 0.5) == {"reached": True, "step": 200, "wall_s": 120, "fid": 0.5}


def test_never_reaching_reports_the_best_point():
    curve = [{"step": 100, "wall_s": 60, "fid": 3.0}, {"step": 200, "wall_s": 120, "fid": 0.9},
             {"step": 300, "wall_s": 180, "fid": 1.1}]
    assert ttq.first_reaching(curve, "fid", 0.5) == {"reached": False, "best_step": 200, "best_wall_s": 120,
                                                     "best_fid": 0.9}
