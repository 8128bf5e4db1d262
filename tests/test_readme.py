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


def test_readme_transformer_example_runs():
    """The transformer block of the README runs as written. Checked against what must hold: the GGN is
    positive semi-definite (non-negative eigenvalues, sorted), and ZSharp filters no norm parameter or bias."""
    import pytest

    pytest.importorskip("transformers")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "hf_model" in b]
    assert len(blocks) == 1, "README has no transformer example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    ggn, top = namespace["ggn"].eigenvalues, namespace["top"].eigenvalues
    assert (ggn >= -1e-6).all() and list(ggn) == sorted(ggn, reverse=True)
    groups = namespace["groups"]
    assert not groups.loc[groups["kind"].isin(["norm", "bias"]), "filtered"].any()
    assert set(groups.loc[groups["filtered"].astype(bool), "kind"]) <= {"attention", "mlp", "embedding", "position", "head"}
    assert len(top) == 3
