from compsearch.cli import main


def test_recipe_check_reports_bad_field_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nlayers:\n  fc1: {w_bits: 7.5}\n")
    assert main(["recipe", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "w_bits: expected one of 2, 3, 4, 5, 6, 7, 8, 16" in err
    assert "Traceback" not in err


def test_recipe_check_against_a_task(tmp_path, capsys, digits_task):
    path = tmp_path / "ok.yaml"
    path.write_text("version: 1\nlayers:\n  fc1: {w_bits: 4}\n")
    assert main(["recipe", "check", str(path), "--task", "digits"]) == 0
    assert "valid for task 'digits'" in capsys.readouterr().out
    path.write_text("version: 1\nlayers:\n  fc9: {w_bits: 4}\n")
    assert main(["recipe", "check", str(path), "--task", "digits"]) == 2
    assert "the model has no module 'fc9'" in capsys.readouterr().err


def test_gpu_check_fails_loudly_where_torch_sees_no_cuda():
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu-check would run in full")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "gpu-check: expected a CUDA device, but torch sees none" in done.stderr
