"""docs/library.md's script runs and prints what the page says it prints."""
import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "library.md"


def test_library_doc_script_runs_and_output_matches():
    text = DOC.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    expected = re.search(r"Output:\n\n    (\[.*?\])\n", text, re.S).group(1)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_example__"})
    assert buf.getvalue().strip() == expected
