"""fi_peer.he_runtime: HE-ready models on disk, what a daemon serves, the CLI flag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fi_peer.errors import ModelError
from fi_peer.he_runtime import he_model_path, load_he_model, runtime_for, save_he_model
from tests.unit.test_he_protocol import DIM, OUT, tiny_model


def test_he_model_round_trips_and_sits_next_to_the_owner_model(tmp_path: Path) -> None:
    owner = tmp_path / "alice.pt"
    path = he_model_path(owner)
    assert path.name == "alice.pt.he.npz"
    model = tiny_model(3)
    save_he_model(path, model)
    loaded = load_he_model(path)
    x = np.linspace(-1, 1, DIM)[None, :]
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert runtime_for(owner, input_dim=DIM, vector_len=OUT).serves
    with pytest.raises(ModelError, match="needs"):
        runtime_for(owner, input_dim=DIM, vector_len=OUT + 1)
    assert not runtime_for(tmp_path / "bob.pt", input_dim=DIM, vector_len=OUT).serves
    assert not runtime_for(None, input_dim=DIM, vector_len=OUT).serves
    (tmp_path / "bad.pt.he.npz").write_bytes(b"not an npz")
    with pytest.raises(ModelError):
        runtime_for(tmp_path / "bad.pt", input_dim=DIM, vector_len=OUT)


def test_query_cli_sends_input_private(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fi_peer import cli

    sent: dict[str, object] = {}

    class Client:
        def post(self, path: str, body: dict[str, object], *, timeout: float) -> dict[str, object]:
            sent.update(body)
            return {"results": [{"ok": True}], "input_private": True}

    monkeypatch.setattr(cli, "_client", lambda config, state_dir: Client())
    monkeypatch.setattr("fi_peer.control.ControlClient", Client)
    data = tmp_path / "x.json"
    data.write_text("[" + ",".join(["0.5"] * 64) + "]")
    result = CliRunner().invoke(cli.app, ["query", str(data), "--input-private", "--json"])
    assert result.exit_code == 0, result.output
    assert sent["input_private"] is True
