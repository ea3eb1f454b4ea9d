"""The ``xentkit`` command: its entry point through ``python -m xentkit`` (``--help``, and
``bench``, which starts a process of its own), every other command line through ``main`` in
this process (a process would spend most of its time importing torch), output captured as
the terminal would show it."""

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import xentkit
from xentkit import cli

LOGITS = "[[1, 0.5, 2], [0.5, 3, 1]]"


def _in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``xentkit ARGV`` run by ``cli.main``: its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse's errors and --help
            code = exit_.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every command line below, name -> CompletedProcess: those in ``processes`` started as
    processes, the others run in this process while those import torch."""
    tmp = tmp_path_factory.mktemp("cli")
    torch.save(torch.tensor([[1.0, 0.5, 2.0], [0.5, 3.0, 1.0]]).log_softmax(1), tmp / "lp.pt")
    torch.save(torch.tensor([2, 1]), tmp / "target.pt")
    np.save(tmp / "probs.npy", np.array([[0.9, 0.2], [0.4, 0.7]], dtype=np.float32))
    np.save(tmp / "labels.npy", np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
    commands = {
        "help": ["--help"],
        "explain": ["explain", LOGITS, "[2, 1]"],
        "pt_nll_json": ["explain", str(tmp / "lp.pt"), str(tmp / "target.pt"), "--loss", "nll",
                        "--format", "json"],
        "npy_bce_markdown": ["explain", str(tmp / "probs.npy"), str(tmp / "labels.npy"),
                             "--loss", "bce", "--format", "markdown"],
        "bce_logits": ["explain", "[[0.5, -2], [3, 0]]", "[[1, 0], [1, 1]]", "--loss",
                       "bce-logits", "--pos-weight", "[2, 1]", "--format", "json"],
        "one_based": ["explain", LOGITS, "[3, 2]"],
        "check": ["check", "--cases", "72", "--seed", "1"],
        "bench_help": ["bench", "--help"],
    }  # fmt: skip
    processes = {"help", "bench_help"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "xentkit", *commands[name]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            cwd=tmp,
        )
        for name in processes
    }
    results = {name: _in_process(argv) for name, argv in commands.items() if name not in processes}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def test_help_lists_every_command(runs):
    r = runs["help"]
    assert r.returncode == 0
    for command in ("explain", "check", "bench"):
        assert command in r.stdout


def test_explain_literal(runs):
    r = runs["explain"]
    assert r.returncode == 0, r.stderr
    assert "[0.2312 0.1402 0.6285]" in r.stdout and "-0.4644" in r.stdout
    assert "-0.1967" in r.stdout and "value: 0.3306" in r.stdout


def test_explain_pt_files_nll_json(runs):
    r = runs["pt_nll_json"]
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["loss"] == "nll_loss" and d["value"] == pytest.approx(0.3306, abs=1e-4)
    assert d["warnings"] == []


def test_explain_npy_files_bce_markdown(runs):
    r = runs["npy_bce_markdown"]
    assert r.returncode == 0, r.stderr
    probs, labels = torch.tensor([[0.9, 0.2], [0.4, 0.7]]), torch.eye(2)
    expected = xentkit.binary_cross_entropy(probs, labels)
    assert "| position | p | target |" in r.stdout
    assert f"value: {float(expected):.4f}" in r.stdout


def test_explain_bce_logits_json(runs):
    r = runs["bce_logits"]
    assert r.returncode == 0, r.stderr
    logits, target = torch.tensor([[0.5, -2.0], [3.0, 0.0]]), torch.tensor([[1.0, 0], [1, 1]])
    expected = xentkit.binary_cross_entropy_with_logits(
        logits, target, pos_weight=torch.tensor([2.0, 1.0])
    )
    assert json.loads(r.stdout)["value"] == pytest.approx(float(expected))


def test_bad_input_is_a_message_not_a_traceback(runs):
    r = runs["one_based"]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("xentkit explain: error: Target 3 is out of bounds")
    assert "labels look 1-based" in r.stderr


def test_check_passes(runs):
    r = runs["check"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "72 cases" in r.stdout and "0 failed" in r.stdout
    for name in ("cross_entropy (one-hot)", "binary_cross_entropy_with_logits", "nll_loss"):
        assert name in r.stdout


def test_bench_passes_its_arguments_through(runs):
    r = runs["bench_help"]
    if cli.bench_script().is_file():
        assert r.returncode == 0 and "usage:" in r.stdout
    else:
        assert r.returncode == 2 and "run.py not found" in r.stderr


# --- in-process: parsing and error paths --------------------------------------------------


def test_bench_without_a_checkout(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "bench_script", lambda: tmp_path / "benchmarks" / "run.py")
    assert cli.main(["bench", "--quick"]) == 2
    assert "run.py not found" in capsys.readouterr().err


def test_literals_and_dtypes():
    assert cli.load_tensor("[2, 1]", "TARGETS").dtype == torch.long
    assert cli.load_tensor("[2.0, 1]", "TARGETS").dtype == torch.float32
    x = cli.load_tensor("[[-inf, nan, Infinity, 1e3]]", "LOGITS")
    assert x.shape == (1, 4) and x[0, 0] == -float("inf") and x[0, 1].isnan()
    assert cli.load_tensor("3", "TARGETS").shape == ()
    assert cli.load_tensor("[0.1]", "LOGITS", torch.float64).item() == 0.1  # parsed, not cast


def test_explain_options(capsys):
    argv = ["explain", LOGITS, "[2, -1]", "--weight", "[1, 2, 3]", "--ignore-index", "-1",
            "--label-smoothing", "0.1", "--z-loss", "0.01", "--softcap", "5",
            "--reduction", "sum", "--dtype", "float64", "--format", "json"]  # fmt: skip
    assert cli.main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    logits = torch.tensor([[1, 0.5, 2], [0.5, 3, 1]], dtype=torch.float64)
    expected = xentkit.cross_entropy(
        logits, torch.tensor([2, -1]), weight=torch.tensor([1.0, 2, 3], dtype=torch.float64),
        ignore_index=-1, label_smoothing=0.1, z_loss=0.01, softcap=5.0, reduction="sum",
    )  # fmt: skip
    assert d["value"] == pytest.approx(float(expected), rel=1e-12)
    assert d["rows"][1]["target"] == "-1 (ignored)"


def test_explain_dim_moves_the_classes(capsys):
    logits = "[[[1, 0.5, 2], [0.5, 3, 1]]]"  # (N=1, T=2, C=3): classes last
    assert cli.main(["explain", logits, "[[2, 1]]", "--dim", "-1"]) == 0
    out = capsys.readouterr().out
    assert "Classes moved from dim -1 to dim 1" in out and "value: 0.3306" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", LOGITS, "[2, 1]", "--loss", "nll", "--label-smoothing", "0.1"],
         "--label-smoothing does not apply to --loss nll"),
        (["explain", "missing.pt", "[2, 1]"], "LOGITS: file 'missing.pt' not found"),
        (["explain", "[[1, 2], [3]]", "[0, 1]"], "LOGITS '[[1, 2], [3]]' is neither a JSON"),
        (["explain", LOGITS, '["a", "b"]'], "only numbers"),
        (["explain", LOGITS, "[2, 1]", "--weight", "[1, 2]"], "weight tensor should be defined"),
        (["explain", LOGITS, "[[1, 0, 0]]"], "Expected input batch_size (2)"),
        (["check", "--cases", "0"], "--cases must be a positive number"),
    ],
)  # fmt: skip
def test_bad_input_messages(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") < 10


def test_not_a_tensor_file(tmp_path, capsys):
    torch.save({"logits": torch.zeros(2)}, tmp_path / "dict.pt")
    assert cli.main(["explain", str(tmp_path / "dict.pt"), "[0]"]) == 2
    assert "holds a dict, not a tensor" in capsys.readouterr().err


def test_explain_html_grad_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "loss.png"
    argv = ["explain", LOGITS, "[2, 1]", "--format", "html", "--grad", "--plot", str(png)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("<div class='xentkit-explain'>") and "<script" not in out
    assert "<th>grad</th>" in out and "value: 0.3306" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert cli.main(["explain", LOGITS, "[2, 1]", "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install 'xentkit[plot]'" in capsys.readouterr().err
