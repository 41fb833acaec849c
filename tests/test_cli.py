"""Tests of the ``linattn`` command line: ``compare`` (with --plot), ``validate``, and the progress bar."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from linattn.cli import Progress, main

SMALL = ["--dim", "8", "--heads", "2", "--repeats", "1"]


def table_rows(stdout: str) -> dict[tuple[str, int], float]:
    """The (method, T) -> relative error entries of the table ``linattn compare`` prints."""
    rows = {}
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[1].isdigit():  # method, T, error, against, time, memory
            rows[(fields[0], int(fields[1]))] = float(fields[2])
    return rows


# ---- linattn compare ----


def test_compare_prints_a_row_per_method_and_length(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--lengths", "16,32", *SMALL]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert {("softmax", 16), ("softmax", 32), ("flash", 16), ("flash", 32)} <= set(rows)


def test_compare_errors_in_float32_are_at_rounding_level(capsys: pytest.CaptureFixture[str]) -> None:
    main(["compare", "--lengths", "16,32", *SMALL])
    rows = table_rows(capsys.readouterr().out)
    # float32 computation against float64 on the same rounded inputs: ~eps32·sqrt(T) ≈ 7e-7.
    assert all(rows[(method, n)] < 1e-5 for method in ("softmax", "flash") for n in (16, 32))


def test_compare_errors_in_float64_are_at_rounding_level(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--lengths", "16,32", "--dtype", "float64", *SMALL]) == 0
    rows = table_rows(capsys.readouterr().out)
    # float64 against float64: only the tiles' summation order differs, ~eps64·sqrt(T) ≈ 1e-15.
    assert all(rows[(method, n)] < 1e-12 for method in ("softmax", "flash") for n in (16, 32))


def test_compare_accepts_space_separated_lengths(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--lengths", "16", "32", "--methods", "flash", *SMALL]) == 0
    assert set(table_rows(capsys.readouterr().out)) == {("flash", 16), ("flash", 32)}


def test_compare_header_states_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    main(["compare", "--lengths", "8", "--methods", "softmax", "--non-causal", *SMALL])
    header = capsys.readouterr().out.splitlines()[0]
    assert "H=2" in header
    assert "D=8" in header
    assert "non-causal" in header


def test_compare_unknown_method_exits_2_naming_the_known_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--lengths", "8", "--methods", "nope", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "nope" in err
    assert "softmax" in err
    assert "flash" in err


@pytest.mark.parametrize("option", ["--dim", "--heads", "--batch", "--repeats"])
def test_compare_non_positive_size_exits_2_naming_the_option(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = dict(zip(SMALL[::2], SMALL[1::2], strict=True))
    args[option] = "0"
    assert main(["compare", "--lengths", "8", *(x for item in args.items() for x in item)]) == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("lengths", ["0", "8,-4"])
def test_compare_non_positive_length_is_an_argparse_error(lengths: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["compare", "--lengths", lengths, *SMALL])
    assert info.value.code == 2
    assert "--lengths" in capsys.readouterr().err


@pytest.mark.parametrize("lengths", ["abc", "8.5"])
def test_compare_non_integer_length_is_an_argparse_error(lengths: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["compare", "--lengths", lengths, *SMALL])
    assert info.value.code == 2


def test_compare_without_any_length_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["compare", "--lengths", ",", *SMALL])
    assert info.value.code == 2


def test_compare_list_names_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert {"softmax", "flash"} <= set(names)


def test_compare_json_writes_settings_and_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "compare.json"
    assert main(["compare", "--lengths", "16", "--json", str(path), *SMALL]) == 0
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) == {"settings", "rows"}
    assert data["settings"]["lengths"] == [16]
    assert data["settings"]["dim"] == 8
    assert {(row["method"], row["length"]) for row in data["rows"]} >= {("softmax", 16), ("flash", 16)}
    printed = table_rows(capsys.readouterr().out)
    for row in data["rows"]:
        # The table prints the error with three significant digits (format .2e).
        assert row["rel_error"] == pytest.approx(printed[(row["method"], row["length"])], rel=5e-3)


def test_compare_without_a_command_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_python_dash_m_linattn_cli_runs_compare() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "linattn.cli", "compare", "--lengths", "8", "--dim", "4", "--heads", "1",
         "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "softmax" in result.stdout


# ---- Progress ----


class FakeStream:
    """A text stream that records what is written and says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.written: list[str] = []

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.written.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.written)


def test_progress_draws_a_bar_on_a_terminal_once_the_delay_has_passed() -> None:
    stream = FakeStream(tty=True)
    progress = Progress(2, stream=stream, delay=0.0)
    progress("softmax T=8")
    assert "[" in stream.text
    assert "1/2" in stream.text
    assert "softmax T=8" in stream.text
    progress("flash T=8")
    assert "2/2" in stream.text


def test_progress_draws_nothing_before_the_delay() -> None:
    stream = FakeStream(tty=True)
    progress = Progress(2, stream=stream, delay=100.0)
    progress("softmax T=8")
    progress.close()
    assert stream.written == []


def test_progress_draws_nothing_on_a_non_terminal_stream() -> None:
    stream = FakeStream(tty=False)
    progress = Progress(2, stream=stream, delay=0.0)
    progress("softmax T=8")
    progress.close()
    assert stream.written == []


def test_progress_force_draws_on_a_non_terminal_stream() -> None:
    stream = FakeStream(tty=False)
    Progress(1, stream=stream, delay=0.0, force=True)("x")
    assert "1/1" in stream.text


def test_progress_close_clears_the_line_only_if_the_bar_was_shown() -> None:
    hidden = FakeStream(tty=True)
    Progress(2, stream=hidden, delay=100.0).close()
    assert hidden.written == []

    shown = FakeStream(tty=True)
    progress = Progress(2, stream=shown, delay=0.0)
    progress("softmax T=8")
    before = len(shown.written)
    progress.close()
    cleared = "".join(shown.written[before:])
    assert cleared.startswith("\r")
    assert cleared.endswith("\r")
    assert cleared.strip() == ""


def test_compare_json_into_a_missing_folder_fails_before_measuring(capsys, tmp_path) -> None:
    assert main(["compare", "--lengths", "8", *SMALL, "--json", str(tmp_path / "nope" / "x.json")]) == 2
    assert "--json folder" in capsys.readouterr().err


def test_return_lse_must_be_a_bool() -> None:
    import numpy as np

    import linattn

    q = np.ones((1, 2, 1, 2))
    with pytest.raises(TypeError, match="return_lse"):
        linattn.softmax_attention(q, q, q, return_lse=1)


# ---- linattn validate ----

VALIDATE = ["validate", "validate_kernels:gla_loop", "--method", "gla"]


def test_validate_a_correct_kernel_exits_0_and_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*VALIDATE, "--cases", "basic", "tail"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("linattn validate: validate_kernels.gla_loop as 'gla'")
    assert "PASSED: 2 passed, 0 failed, 0 errors, 2 skipped" in out
    assert "not differentiable" in out
    assert "tol = 8*eps*sqrt(n)*kappa" in out


def test_validate_a_buggy_kernel_exits_1_naming_the_property(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "validate_kernels:softmax_np", "--method", "softmax", "--no-grads",
                 "--cases", "basic", "causality"]) == 0
    capsys.readouterr()
    # the same kernel with its off-by-one mask: a partial is not importable, so a module attribute path
    assert main(["validate", "test_cli:off_by_one_softmax", "--method", "softmax", "--no-grads",
                 "--cases", "causality"]) == 1
    out = capsys.readouterr().out
    assert "FAIL   causality: outputs up to t = 40 moved" in out
    assert "failed: causality" in out


def off_by_one_softmax(q, k, v, *, causal=False, scale=None):
    import validate_kernels

    return validate_kernels.softmax_np(q, k, v, causal=causal, scale=scale, bug="off_by_one")


def test_validate_json_prints_the_report_as_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([*VALIDATE, "--cases", "t1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is True
    assert [(r["case"], r["check"], r["status"]) for r in data["rows"]] == [("t1", "output", "pass"),
                                                                              ("t1", "gradients", "skip")]
    path = tmp_path / "report.json"
    assert main([*VALIDATE, "--cases", "t1", "--dtype", "fp16", "float64", "--json", str(path)]) == 0
    assert json.loads(path.read_text(encoding="utf-8"))["dtypes"] == ["float16", "float64"]


def test_validate_with_a_backward(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "linattn:gla", "--method", "gla", "--backward", "linattn:gla_vjp", "--cases",
                 "basic"]) == 0
    assert "basic         gradients" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["validate", "nope_module:f", "--method", "gla"], "cannot import 'nope_module'"),
    (["validate", "validate_kernels:nope", "--method", "gla"], "has no attribute 'nope'"),
    (["validate", "validate_kernels", "--method", "gla"], "MODULE:FUNCTION must look like"),
    ([*VALIDATE, "--cases", "nope"], "cases must be among"),
    ([*VALIDATE, "--dtype", "int8"], "dtypes must be among"),
    ([*VALIDATE, "--json", "/nonexistent/folder/r.json"], "--json folder"),
    ([*VALIDATE, "--backward", "validate_kernels:nope"], "has no attribute 'nope'"),
])
def test_validate_usage_errors_exit_2_with_the_reason(args, message, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["validate", "x:y"], ["validate", "x:y", "--method", "nope"],
                                  [*VALIDATE, "--adapter", "nope"]])
def test_validate_argparse_errors_exit_2(args) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2


def test_validate_runs_as_a_console_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "linattn.cli", "validate", "validate_kernels:gla_loop", "--method", "gla", "--cases",
         "basic"],
        capture_output=True, text=True, timeout=120, check=False, cwd=Path(__file__).parent,
    )
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout


# ---- linattn compare --plot ----


def test_compare_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "compare.png"
    assert main(["compare", "--lengths", "8,16", "--methods", "softmax", "flash", *SMALL, "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path}" in capsys.readouterr().out


def test_compare_plot_into_a_missing_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--lengths", "8", *SMALL, "--plot", str(tmp_path / "no" / "x.png")]) == 2
    assert "--plot folder" in capsys.readouterr().err


def test_compare_plot_without_matplotlib_exits_2_before_measuring(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["compare", "--lengths", "8", *SMALL, "--plot", str(tmp_path / "x.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_compare_on_cupy_without_a_gpu_is_a_usage_error(capsys):
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("a CUDA device is present: tests/gpu runs compare --backend cupy")
    except Exception:  # no CuPy, or CuPy without a device: the case under test
        pass
    code = main(["compare", "--backend", "cupy", "--lengths", "16", "--methods", "linear", "--no-progress"])
    assert code == 2
    assert "backend='cupy' needs CuPy and a CUDA device" in capsys.readouterr().err
