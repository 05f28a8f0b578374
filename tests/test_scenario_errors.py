"""Bad input: one line naming the field and the fix, exit code 2, no traceback."""

from __future__ import annotations

import json

import pytest

from moesim import InputError, parse_scenario

from .conftest import run_cli


def _with(base: dict, path: str, value) -> dict:
    d = json.loads(json.dumps(base))
    node = d
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return d


@pytest.mark.parametrize("path,value,expect", [
    ("deployment.tpp", 2, "deployment.tpp"),                       # unknown key
    ("workload.batch_size", -4, "workload.batch_size"),            # negative batch
    ("workload.input_len", 0, "workload.input_len"),               # zero length
    ("workload.output_len", "many", "workload.output_len"),        # wrong type
    ("deployment.tp", 3, "deployment.tp"),                         # does not divide heads
    ("deployment.weight_dtype", "fp5", "deployment.weight_dtype"),  # unknown dtype
    ("deployment.framework", "tgi", "deployment.framework"),
    ("model", "mixtral-9x9b", "model"),                            # unknown preset
    ("hardware", {"profile": "h300"}, "hardware.profile"),         # unknown profile
    ("hardware", {"profile": "h100_sxm", "num_gpus": 4}, "hardware.num_gpus"),  # group mismatch
    ("routing.distribution", "gaussian", "routing.distribution"),
])
def test_bad_field_is_named(scenario_dict, path, value, expect):
    with pytest.raises(InputError) as err:
        parse_scenario(_with(scenario_dict, path, value))
    msg = err.value.one_line()
    assert expect in msg
    assert "\n" not in msg


def test_ep_must_divide_experts(scenario_dict):
    d = _with(scenario_dict, "deployment", {"tp": 1, "attention_dp": 3, "ep": 3})
    d = _with(d, "hardware", {"profile": "h100_sxm", "num_gpus": 3})
    with pytest.raises(InputError) as err:
        parse_scenario(d)
    assert "deployment.ep" in str(err.value) and "8 experts" in str(err.value)
    assert "use one of [1, 2, 4, 8]" in str(err.value)


def test_moe_group_must_match_attention_group(scenario_dict):
    d = _with(scenario_dict, "deployment", {"tp": 2, "ep": 2, "moe_tp": 2})
    with pytest.raises(InputError) as err:
        parse_scenario(d)
    assert "moe_tp*ep" in str(err.value)


def test_fp8_activations_need_fp8_hardware(scenario_dict):
    d = _with(scenario_dict, "hardware", {"profile": "a100_sxm", "num_gpus": 2})
    d = _with(d, "deployment.activation_dtype", "fp8")
    with pytest.raises(InputError) as err:
        parse_scenario(d)
    assert "activation_dtype" in str(err.value)


def test_cli_bad_input_exit_2_one_line(tmp_path, scenario_dict):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_with(scenario_dict, "deployment.ep", 3)))
    r = run_cli("predict", str(bad))
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: deployment.ep")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("content,expect", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON/YAML object"),
])
def test_cli_unreadable_files(tmp_path, content, expect):
    f = tmp_path / "s.json"
    f.write_text(content)
    r = run_cli("predict", str(f))
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr


def test_cli_missing_file_and_no_args():
    r = run_cli("predict", "does/not/exist.json")
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = run_cli("predict")
    assert r.returncode == 2 and "usage" in r.stderr
    r = run_cli()
    assert r.returncode == 2 and "usage" in r.stderr


def test_profile_missing_field(tmp_path, scenario_dict):
    import yaml

    from moesim.spec.hardware import PROFILES_DIR

    data = yaml.safe_load((PROFILES_DIR / "h100_sxm.yaml").read_text())
    del data["interconnect"]["scaleout_latency_us"]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as err:
        parse_scenario(_with(scenario_dict, "hardware", {"profile": str(path), "num_gpus": 2}))
    assert "scaleout_latency_us" in str(err.value)
