"""demo/demo.py and tools/plot_metrics.py write the pictures they promise."""
import json
import subprocess
import sys

from PIL import Image

from conftest import REPO
from ks_detr.data.datasets import datasets_root


def test_demo_writes_png_per_image(tmp_path):
    image = str(datasets_root() / "trees" / "images" / "SOAP_061_0_0.jpg")
    r = subprocess.run([sys.executable, "demo/demo.py", "--config-file", "configs/ks_conditional_detr_r50.yaml",
                        "--input", image, "--output", str(tmp_path), "--confidence", "0.0",
                        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.DETR.NUM_CLASSES", "1",
                        "MODEL.DETR.NUM_QUERIES", "10", "DATASETS.TEST", '("trees_val",)',
                        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "10 boxes with score >= 0.0" in r.stdout  # top-k = min(300, 10 queries x 1 class)
    with Image.open(tmp_path / "SOAP_061_0_0.png") as out, Image.open(image) as src:
        assert out.size == src.size


def test_demo_rejects_missing_input(tmp_path):
    r = subprocess.run([sys.executable, "demo/demo.py", "--config-file", "configs/conditional_detr_r50.yaml",
                        "--input", str(tmp_path / "nope.jpg"), "--output", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "nope.jpg" in r.stderr


def test_plot_metrics(tmp_path):
    rows = [{"iteration": i, "total_loss": 10.0 / (i + 1), "loss_class": 1.0 / (i + 1)} for i in range(0, 40, 20)]
    rows.append({"iteration": 39, "bbox/AP": 1.5, "bbox/AP50": 4.0})
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    with Image.open(tmp_path / "metrics.png") as im:
        assert im.size == (800, 700)
    r = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path), "--x", "minutes"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "wall_minutes" in r.stderr  # an old metrics.json has no wall clock
    for row, minutes in zip(rows, (0.1, 0.5, 0.6)):
        row["wall_minutes"] = minutes
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    other = tmp_path / "ks"
    other.mkdir()
    (other / "metrics.json").write_text((tmp_path / "metrics.json").read_text())
    subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path), str(other), "--x", "minutes",
                    "--out", str(tmp_path / "both.png")], cwd=REPO, check=True, capture_output=True)
    with Image.open(tmp_path / "both.png") as im:
        assert im.size == (800, 700)
    r = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path / "missing")], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "metrics.json does not exist" in r.stderr
