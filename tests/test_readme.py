"""The README's Python example runs as written (documentation that cannot rot)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """Checks against the README itself: its ```python block executes without error."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert (tmp_path / "my_density.png").stat().st_size > 0
    assert namespace["eig"].eigenvalues[0] >= namespace["eig"].eigenvalues[-1]
