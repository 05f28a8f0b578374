"""Model importer and preset registry: every reference config imports, every preset loads, the
parameter counts match the published figures, and bad input fails with a named field."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from moesim.errors import InputError
from moesim.spec.hf_import import model_from_hf_config
from moesim.spec.model import ModelSpec
from moesim.spec.presets import PRESETS, PRESETS_DIR, list_presets, load_model

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "hf_configs"
REFERENCE_FOLDERS = sorted(p.name for p in REFERENCE.iterdir() if p.is_dir()) \
    if REFERENCE.is_dir() else []


def _config(preset: str) -> dict:
    folder = PRESETS_DIR / PRESETS[preset].replace("/", "--")
    return json.loads((folder / "config.json").read_text())


# ---- every config, every preset -------------------------------------------------------------

@pytest.mark.parametrize("folder", REFERENCE_FOLDERS)
def test_reference_config_imports(folder: str) -> None:
    config = json.loads((REFERENCE / folder / "config.json").read_text())
    spec = model_from_hf_config(config, name=folder, hf_id=folder.replace("--", "/"))
    assert spec.total_params > spec.active_params_excl_input_embedding > 0
    assert len(spec.layer_attention) == len(spec.layer_mlp) == spec.num_layers


@pytest.mark.parametrize("folder", REFERENCE_FOLDERS)
def test_reference_config_is_a_preset(folder: str) -> None:
    hf_id = folder.replace("--", "/", 1)
    assert hf_id in PRESETS.values()
    shipped = PRESETS_DIR / folder / "config.json"
    reference = REFERENCE / folder / "config.json"
    assert json.loads(shipped.read_text()) == json.loads(reference.read_text())


@pytest.mark.parametrize("name", list_presets())
def test_preset_loads(name: str) -> None:
    spec = load_model(name)
    assert spec.name == name and spec.hf_id == PRESETS[name]
    assert load_model(PRESETS[name].upper()) is spec  # HF id, any case, same cached object


def test_presets_are_cached_and_fast() -> None:
    for name in list_presets():
        load_model(name)
    start = time.perf_counter()
    for name in list_presets():
        load_model(name)
    assert time.perf_counter() - start < 0.05


# ---- parameter counts vs published figures --------------------------------------------------
# (preset, published total, published active, property that matches the publisher's convention)
# "active_params" counts both embedding tables; gpt-oss's model card counts the LM head but not
# the input embedding (a row lookup): 116.83B total, 5.13B active for 120b.
# DeepSeek-V3's 671B excludes the 14B multi-token-prediction module (HF model card: 685B = 671B
# main model + 14B MTP); the importer leaves MTP layers out. Llama-4-Scout's 109B includes the
# vision encoder, which is not modelled: the text decoder is 107.8B (-1.1 %).
PUBLISHED = [
    ("mixtral-8x7b", 46.7e9, 12.9e9, "active_params"),      # Mistral AI, Mixtral of experts
    ("mixtral-8x22b", 141e9, 39e9, "active_params"),        # Mistral AI, Mixtral 8x22B
    ("deepseek-v3", 671e9, 37e9, "active_params"),          # DeepSeek-V3 technical report
    ("deepseek-r1", 671e9, 37e9, "active_params"),
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, "active_params"),      # Qwen3 model cards
    ("qwen3-235b-a22b", 235e9, 22e9, "active_params"),
    ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9, "active_params"),  # Qwen1.5-MoE blog
    ("gpt-oss-120b", 117e9, 5.1e9, "active_params_excl_input_embedding"),  # gpt-oss model card
    ("gpt-oss-20b", 21e9, 3.6e9, "active_params_excl_input_embedding"),
    ("olmoe-1b-7b", 6.9e9, 1.3e9, "active_params"),         # OLMoE paper
    ("llama-4-scout", 109e9, 17e9, "active_params"),        # Meta Llama 4 model card
    ("llama-4-maverick", 400e9, 17e9, "active_params"),
    ("llama-3.1-8b", 8.03e9, 8.03e9, "active_params"),
    ("llama-3.1-70b", 70.6e9, 70.6e9, "active_params"),
    ("qwen3-32b", 32.8e9, 32.8e9, "active_params"),
]


@pytest.mark.parametrize("name,total,active,convention", PUBLISHED)
def test_param_counts_match_published(name: str, total: float, active: float,
                                      convention: str) -> None:
    spec = load_model(name)
    assert spec.total_params == pytest.approx(total, rel=0.02)
    assert getattr(spec, convention) == pytest.approx(active, rel=0.02)


def test_qwen35_counts() -> None:
    # Model card: "397B in total and 17B activated", both rounded to whole billions. The text
    # decoder is 396.3B (the vision tower is not modelled); active is 17.35B with embeddings,
    # 2.05 % above the rounded 17B, so the active check is that it rounds to 17.
    spec = load_model("qwen3.5-397b-a17b")
    assert spec.total_params == pytest.approx(397e9, rel=0.02)
    assert round(spec.active_params / 1e9) == 17


def test_glm5_total_includes_dsa_indexer() -> None:
    spec = load_model("glm-5")
    mla = spec.mla
    assert mla is not None
    assert (mla.index_n_heads, mla.index_head_dim, mla.index_topk) == (32, 128, 2048)
    without = ModelSpec.model_validate(
        {**spec.model_dump(), "mla": {**mla.model_dump(), "index_n_heads": 0, "index_head_dim": 0}})
    h = spec.hidden_size
    indexer = 2048 * 32 * 128 + h * 128 + 2 * 128 + h * 32  # wq_b, wk, k_norm, weights_proj
    assert spec.attention_params("full") - without.attention_params("full") == indexer
    assert spec.total_params == pytest.approx(744e9, rel=0.02)  # Z.ai: 744B total


# ---- structure ------------------------------------------------------------------------------

def test_deepseek_v3_structure() -> None:
    spec = load_model("deepseek-v3")
    assert spec.layer_mlp[:3] == ["dense"] * 3 and spec.layer_mlp.count("moe") == 58
    assert spec.num_moe_layers == 58 and spec.dense_intermediate_size == 18432
    assert spec.mla is not None and spec.mla.kv_lora_rank == 512 and spec.mla.q_lora_rank == 1536
    moe = spec.moe
    assert moe is not None
    assert (moe.num_experts, moe.top_k, moe.num_shared_experts, moe.scoring,
            moe.num_expert_groups) == (256, 8, 1, "sigmoid", 8)
    assert spec.checkpoint_dtype == "fp8_block" and spec.checkpoint_expert_dtype is None


def test_deepseek_v2_lite_has_no_query_compression() -> None:
    spec = load_model("deepseek-v2-lite")
    assert spec.mla is not None and spec.mla.q_lora_rank is None
    assert spec.moe is not None
    assert spec.moe.num_shared_experts == 2 and spec.moe.scoring == "softmax"
    assert spec.layer_mlp[0] == "dense" and spec.num_moe_layers == 26


def test_gpt_oss_alternates_sliding_and_full() -> None:
    spec = load_model("gpt-oss-120b")
    assert spec.layer_attention == ["sliding", "full"] * 18
    assert spec.sliding_window == 128
    assert spec.moe is not None and (spec.moe.num_experts, spec.moe.top_k) == (128, 4)
    assert spec.checkpoint_dtype == "bf16" and spec.checkpoint_expert_dtype == "mxfp4"


def test_llama4_maverick_alternates_dense_and_moe() -> None:
    spec = load_model("llama-4-maverick")
    assert spec.layer_mlp == ["dense", "moe"] * 24
    assert spec.dense_intermediate_size == 16384
    moe = spec.moe
    assert moe is not None
    assert (moe.num_experts, moe.top_k, moe.num_shared_experts, moe.shared_expert_intermediate_size,
            moe.expert_intermediate_size) == (128, 1, 1, 8192, 8192)


def test_llama4_nope_layers_are_full_the_rest_chunked() -> None:
    # transformers Llama4TextConfig: no_rope_layers[i] = int((i + 1) % 4 != 0); 1 = RoPE + chunked.
    spec = load_model("llama-4-scout")
    assert [i for i, k in enumerate(spec.layer_attention) if k == "full"] == list(range(3, 48, 4))
    assert spec.layer_attention.count("chunked") == 36 and spec.attention_chunk_size == 8192
    assert spec.layer_mlp == ["moe"] * 48


def test_qwen35_linear_and_full_three_to_one() -> None:
    spec = load_model("qwen3.5-397b-a17b")
    assert spec.layer_attention == ["linear", "linear", "linear", "full"] * 15
    assert spec.attention_output_gate
    la = spec.linear_attention
    assert la is not None and la.variant == "gated_deltanet"
    assert (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim) \
        == (16, 64, 128, 128)
    assert spec.moe is not None and spec.moe.num_shared_experts == 1


def test_kimi_k25_int4_routed_experts_only() -> None:
    spec = load_model("kimi-k2.5")
    assert spec.checkpoint_dtype == "bf16" and spec.checkpoint_expert_dtype == "int4"
    assert spec.layer_mlp.count("dense") == 1
    assert spec.moe is not None and spec.moe.num_experts == 384


def test_qwen3_fp8_quantizes_everything() -> None:
    # Its exclusion list names post_attention_layernorm: that must not read as "attention kept
    # in bf16", which would make the fp8 apply to the experts only.
    spec = load_model("qwen3-235b-a22b-fp8")
    assert spec.checkpoint_dtype == "fp8_block" and spec.checkpoint_expert_dtype is None


def test_qwen2_moe_shared_expert() -> None:
    spec = load_model("qwen1.5-moe-a2.7b")
    assert spec.moe is not None
    assert (spec.moe.num_shared_experts, spec.moe.shared_expert_intermediate_size) == (1, 5632)


def test_minimax_text01_lightning_layers() -> None:
    # The shape of MiniMax-Text-01's config (remote code, attn_type_list: 1 = softmax layer).
    config = {"model_type": "minimax_text_01", "hidden_size": 6144, "intermediate_size": 9216,
              "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
              "head_dim": 128, "num_local_experts": 32, "num_experts_per_tok": 2,
              "vocab_size": 200064, "attn_type_list": ([0] * 7 + [1]) * 10}
    spec = model_from_hf_config(config, name="minimax-text-01")
    assert spec.layer_attention.count("linear") == 70 and spec.layer_attention[7] == "full"
    assert spec.linear_attention is not None and spec.linear_attention.variant == "lightning"
    assert spec.total_params == pytest.approx(456e9, rel=0.02)  # MiniMax-01 report: 456B


def test_layer_rules_qwen_sparse_step_and_mlp_only() -> None:
    config = {**_config("qwen3-30b-a3b"), "decoder_sparse_step": 2, "mlp_only_layers": [1]}
    spec = model_from_hf_config(config, name="x")
    assert spec.layer_mlp[:4] == ["dense", "dense", "dense", "moe"]
    assert spec.dense_intermediate_size == 6144


# ---- reference forms ------------------------------------------------------------------------

def test_folder_file_and_inline_refs_agree(tmp_path: Path) -> None:
    src = PRESETS_DIR / "mistralai--Mixtral-8x7B-v0.1"
    folder = tmp_path / "mistralai--Mixtral-8x7B-v0.1"
    shutil.copytree(src, folder)
    by_folder = load_model(str(folder))
    by_file = load_model(folder / "config.json")
    inline = load_model(json.loads((src / "config.json").read_text()))
    assert by_folder.hf_id == "mistralai/Mixtral-8x7B-v0.1"
    assert by_folder.name == by_file.name == folder.name
    assert by_folder.total_params == by_file.total_params == inline.total_params \
        == load_model("mixtral-8x7b").total_params


def test_inline_and_yaml_modelspec(tmp_path: Path) -> None:
    body = load_model("olmoe-1b-7b").model_dump()
    assert load_model(body) == load_model("olmoe-1b-7b")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in body.items() if k != "name"}))
    assert load_model(path).name == "mine"


def test_hf_quant_config_is_folded_in(tmp_path: Path) -> None:
    shutil.copytree(PRESETS_DIR / "meta-llama--Meta-Llama-3.1-8B", tmp_path / "m")
    (tmp_path / "m" / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"},
         "quantization": {"quant_algo": "NVFP4", "exclude_modules": ["lm_head"]}}))
    assert load_model(tmp_path / "m").checkpoint_dtype == "nvfp4"


# ---- errors ---------------------------------------------------------------------------------

def test_unknown_model_type() -> None:
    with pytest.raises(InputError) as err:
        load_model({**_config("mixtral-8x7b"), "model_type": "mamba2"})
    assert err.value.field == "model.model_type" and "mamba2" in str(err.value)
    assert "mixtral" in err.value.fix


def test_unknown_text_model_type_names_text_config() -> None:
    config = _config("llama-4-scout")
    config["text_config"] = {**config["text_config"], "model_type": "bogus_text"}
    with pytest.raises(InputError) as err:
        load_model(config)
    assert err.value.field == "model.text_config.model_type"


def test_unknown_preset() -> None:
    with pytest.raises(InputError) as err:
        load_model("deepsek-v3", field="scenario.model")
    text = str(err.value)
    assert err.value.field == "scenario.model" and "deepsek-v3" in text
    assert "did you mean 'deepseek-v3'" in text and "python -m moesim models" in text
    assert "\n" not in text


def test_inline_modelspec_unknown_key() -> None:
    body = {**load_model("mixtral-8x7b").model_dump(), "num_expertz": 8}
    with pytest.raises(InputError) as err:
        load_model(body)
    assert "num_expertz" in str(err.value) and err.value.field == "model.num_expertz"


def test_missing_hidden_size() -> None:
    config = _config("qwen3-30b-a3b")
    del config["hidden_size"]
    with pytest.raises(InputError) as err:
        load_model(config)
    assert err.value.field == "model.hidden_size" and "missing" in err.value.message


def test_missing_key_inside_text_config() -> None:
    config = _config("kimi-k2.5")
    config["text_config"] = {k: v for k, v in config["text_config"].items() if k != "kv_lora_rank"}
    with pytest.raises(InputError) as err:
        load_model(config)
    assert err.value.field == "model.text_config.kv_lora_rank"


@pytest.mark.parametrize("key,value,field", [
    ("hidden_act", "relu2", "model.hidden_act"),
    ("num_hidden_layers", "48", "model.num_hidden_layers"),
    ("layer_types", ["full_attention"] * 47 + ["mamba"], "model.layer_types[47]"),
    ("quantization_config", {"quant_method": "bitsandbytes"},
     "model.quantization_config.quant_method"),
    ("torch_dtype", "float64", "model.torch_dtype"),
])
def test_unrepresentable_values_are_named(key: str, value: object, field: str) -> None:
    with pytest.raises(InputError) as err:
        load_model({**_config("qwen3-30b-a3b"), key: value})
    assert err.value.field == field


def test_deepseek_needs_first_k_dense_replace() -> None:
    config = _config("deepseek-v3")
    del config["first_k_dense_replace"]
    with pytest.raises(InputError) as err:
        load_model(config)
    assert err.value.field == "model.first_k_dense_replace"


def test_top_k_above_experts_is_an_input_error() -> None:
    with pytest.raises(InputError) as err:
        load_model({**_config("mixtral-8x7b"), "num_experts_per_tok": 9})
    assert err.value.field.startswith("model") and "top_k" in err.value.message
