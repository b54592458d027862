"""Progress output without a terminal: plain lines, not tqdm's carriage-return refreshes."""

import io

from click.testing import CliRunner

from pipeline.progress import progress
from stages.cli import main


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_without_a_terminal_a_bar_prints_one_plain_line_when_it_closes(capsys):
    for _ in progress(range(500), desc="epoch 1/4", unit="batch"):
        pass
    bar = progress(total=3, desc="teach t", unit="view")
    for _ in range(3):
        bar.update()
        bar.set_postfix(loss="0.123", refresh=False)
    bar.close()
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("epoch 1/4: 500/500 batch in ") and lines[1].endswith("loss=0.123")


def test_on_a_terminal_it_is_tqdm(capsys):
    out = _Terminal()
    for _ in progress(range(3), desc="shard", file=out):
        pass
    assert "\r" in out.getvalue() and "shard" in out.getvalue() and capsys.readouterr().err == ""


def test_disabled_prints_nothing(capsys):
    for _ in progress(range(3), desc="quiet", disable=True):
        pass
    assert capsys.readouterr().err == ""


def test_under_dvc_the_first_line_names_the_stage_and_what_it_does(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "report")
    (tmp_path / "params.yaml").write_text("{}\n")
    result = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "report", "--metrics",
                                       str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.stderr.splitlines()[0] == "report: Table + figure of every evaluated student."
