"""scripts/nbtools.py: JupyterLab's save form (its kernel spec), stream outputs merged as JupyterLab's
output area shows them (with its terminal emulation), the measured "Time to run" line, and the
setup-cell preamble with a notebook's extras."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("nbtools", ROOT / "scripts" / "nbtools.py")
nbtools = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbtools)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain\n", "plain\n"),
        ("10%\r100%\n", "100%\n"),  # a progress line redrawn in place
        ("abc\rX\n", "Xbc\n"),  # "\r" overwrites from the line start; the rest of the line stays
        ("ab\bc\n", "ac\n"),  # backspace deletes the character before the cursor
        ("a\n\bb", "a\nb"),  # ...but not a newline
        ("one\ntwo\rTW\n", "one\nTWo\n"),
    ],
)
def test_terminal_text_follows_jupyterlab(text, expected):
    assert nbtools.terminal_text(text)[0] == expected


def _stream(name, text):
    return nbformat.v4.new_output("stream", name=name, text=text)


def test_consecutive_streams_of_one_name_merge_and_others_do_not():
    shown = nbformat.v4.new_output("display_data", data={"text/plain": "x"})
    outputs = [_stream("stdout", "a\n"), _stream("stdout", "b\n"), _stream("stderr", "w\n"),
               _stream("stdout", "c\n"), shown, _stream("stdout", "d\n")]
    merged = nbtools.jupyterlab_outputs(outputs)
    assert [(o.get("name"), o.get("text")) for o in merged] == [
        ("stdout", "a\nb\n"), ("stderr", "w\n"), ("stdout", "c\n"), (None, None), ("stdout", "d\n")]


def test_a_redraw_split_over_two_stream_messages_merges_like_jupyterlab():
    merged = nbtools.jupyterlab_outputs([_stream("stderr", "step 1/2"), _stream("stderr", "\rstep 2/2\n")])
    assert merged[0]["text"] == "step 2/2\n"


def _tiny_notebook(tmp_path, kernel_name="Python 3"):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# T\n\n**Time to run**: about 5 s."),
                nbformat.v4.new_code_cell("print(1)")]
    nb.cells[1].outputs = [_stream("stdout", "1\n"), _stream("stdout", "2\n")]
    nb.metadata["kernelspec"] = {"display_name": kernel_name, "language": "python", "name": "python3"}
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, path)
    return path


def test_saved_text_differs_until_the_file_is_in_jupyterlab_form(tmp_path):
    path = _tiny_notebook(tmp_path)
    saved = nbtools.jupyterlab_saved_text(path)
    assert saved != path.read_text()
    assert '"display_name": "Python 3 (ipykernel)"' in saved
    assert saved.count('"output_type": "stream"') == 2  # JupyterLab saves streams as they are
    path.write_text(saved)
    assert nbtools.jupyterlab_saved_text(path) == saved  # a second open and save changes nothing


def test_time_to_run_line_is_replaced_by_the_measurement(tmp_path):
    nb = nbformat.read(_tiny_notebook(tmp_path), as_version=4)
    nbtools.set_time_to_run(nb, 12.2)
    assert nbtools.time_to_run_line(13) in nb.cells[0].source
    nb.cells[0].source = "# T"
    with pytest.raises(ValueError, match="Time to run"):
        nbtools.set_time_to_run(nb, 1.0)


def test_setup_preamble_installs_the_named_extras():
    assert nbtools.setup_preamble(("peft",))[-1].endswith(f'"llmlab[peft] @ git+{nbtools.repo_url()}"')
    assert "llmlab @ git+" in nbtools.setup_preamble()[-1]
    assert set(nbtools.optional_dependencies()) >= {"peft", "test"}
