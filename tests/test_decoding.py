"""serving.decoding: one setting, applied alike where the model is evaluated and where it is served. The in-process
scorer's logits processor follows vLLM's penalty rule on the generated tokens only; the rendered `vllm serve` config
and the evaluation's own vLLM command carry it as --override-generation-config, which vLLM's parser accepts; the
evaluation cache follows it. (tests/test_eval_vllm.py compares the generations of both engines token by token.)"""
from __future__ import annotations

import pytest
import torch

from eval.evaluate import cache_key
from eval.generate import cut_at_stop, output_penalties
from serving.config import render_vllm_config, validate_with_vllm, write_vllm_config
from workspace.config import ConfigError, load_config
from workspace.model_ref import ModelRef
from workspace.vllm_server import VllmServer


def test_the_penalty_counts_generated_tokens_only():
    p = output_penalties(2, frequency_penalty=0.2, presence_penalty=0.5)
    ids = torch.tensor([[9, 9, 1, 1, 3], [4, 4, 4, 0, 0]])  # the first 2 columns are the (padded) prompt
    out = p(ids, torch.zeros(2, 10))
    assert out[0, 9] == 0  # a prompt token is not penalised
    assert out[0, 1] == pytest.approx(-(0.2 * 2 + 0.5)) and out[0, 3] == pytest.approx(-(0.2 + 0.5))
    assert out[1, 4] == pytest.approx(-(0.2 + 0.5)) and out[1, 0] == pytest.approx(-(0.2 * 2 + 0.5))
    assert torch.equal(output_penalties(5)(ids, torch.ones(2, 10)), torch.ones(2, 10))  # nothing generated yet


def test_a_stop_string_cuts_where_vllm_would():
    assert cut_at_stop("<Screen/>\n</Screen>\n<Screen>x</Screen>", ["</Screen>"]) == "<Screen/>\n</Screen>"
    assert cut_at_stop("ab END cd STOP", ["STOP", "END"]) == "ab END"  # the stop string that ends first
    assert cut_at_stop("no stop here", ["</Screen>"]) == "no stop here" == cut_at_stop("no stop here", [])


def test_stop_strings_are_a_request_default_not_a_server_flag():
    """vLLM's --override-generation-config takes no stop strings: they travel with each request (the gateway adds
    them), kept in the output, and they are part of what the evaluation decodes with."""
    decoding = load_config().config.serving.decoding  # configs/pipeline.yaml: stop at the closing root tag
    assert decoding.stop == ["</Screen>"]
    assert decoding.request_defaults() == {"stop": ["</Screen>"], "include_stop_str_in_output": True}
    assert decoding.non_default() == {"frequency_penalty": 0.2, "stop": ["</Screen>"], "include_stop_str_in_output": True}
    assert decoding.penalties() == {"frequency_penalty": 0.2}
    assert load_config(overrides=["serving.decoding.stop=[]"]).config.serving.decoding.request_defaults() == {}
    with pytest.raises(ConfigError, match="serving.decoding.stop"):
        load_config(overrides=['serving.decoding.stop=[""]'])
    with pytest.raises(ConfigError, match="serving.decoding.stop"):
        load_config(overrides=['serving.decoding.stop=["a","b","c","d","e"]'])


def test_the_served_config_carries_the_decoding_and_vllm_parses_it(tmp_path):
    loaded = load_config()  # cpu_tiny: frequency_penalty 0.2
    conf = render_vllm_config(loaded.config.serving, "models/base-tiny")
    assert conf["override-generation-config"] == {"frequency_penalty": 0.2}  # no stop strings: vLLM takes none here
    validate_with_vllm(write_vllm_config(conf, tmp_path / "serving.yaml", None))
    argv = VllmServer("models/base-tiny", loaded.config.serving).argv()
    assert argv[argv.index("--override-generation-config") + 1] == '{"frequency_penalty": 0.2}'
    plain = load_config(overrides=["serving.decoding.frequency_penalty=0"]).config.serving
    assert "override-generation-config" not in render_vllm_config(plain, "m")
    assert "--override-generation-config" not in VllmServer("m", plain).argv()
    with pytest.raises(ConfigError, match="serving.decoding.frequency_penalty"):
        load_config(overrides=["serving.decoding.frequency_penalty=3"])


def test_the_evaluation_cache_follows_the_decoding(tmp_path):
    model = ModelRef("base", str(load_config().config.base_model.path))
    test = tmp_path / "test.jsonl"
    test.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    keys = {cache_key(load_config(overrides=[f"serving.decoding.frequency_penalty={v}"]), model, ("custom",), test, "hf")
            for v in (0, 0.2, 0.3)}
    assert len(keys) == 3
    no_stop = cache_key(load_config(overrides=["serving.decoding.stop=[]"]), model, ("custom",), test, "hf")
    assert no_stop not in keys
