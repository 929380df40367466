import json

from typer.testing import CliRunner

from hf_factory import save_hf_model
from offbatch.cli.main import app

runner = CliRunner()


def test_inspect_json_counts_every_byte(tmp_path):
    model = save_hf_model("qwen2_moe", tmp_path)
    r = runner.invoke(app, ["inspect", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    n_params = sum(p.numel() for p in model.parameters())
    assert rep["family"] == "qwen2_moe" and rep["parameters"] == n_params
    assert rep["bytes"] == 4 * n_params
    layer_total = sum(row["total"] for row in rep["per_layer"]) + sum(rep["global_bytes"].values())
    assert layer_total == rep["bytes"]
    # mlp_only_layers=[1]: layer 1 is dense, 0 and 2 sparse with 4 experts and a shared expert.
    assert rep["per_layer"][1]["experts"] == [] and rep["per_layer"][1]["ffn"] > 0
    assert len(rep["per_layer"][0]["experts"]) == 4 and rep["per_layer"][0]["shared"] > 0
    assert rep["kv_bytes_per_token"] == 2 * 3 * 2 * 16 * 4  # k+v, layers, kv heads, head dim, fp32


def test_inspect_table_and_bad_folder(tmp_path):
    save_hf_model("llama", tmp_path / "m")
    r = runner.invoke(app, ["inspect", str(tmp_path / "m")])
    assert r.exit_code == 0 and "llama" in r.output and "per layer" in r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 3
    assert "does not exist" in r.output
