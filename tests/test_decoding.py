"""serving.decoding: one setting, applied alike where the model is evaluated and where it is served. The in-process
scorer's logits processor follows vLLM's penalty rule on the generated tokens only; the rendered `vllm serve` config
and the evaluation's own vLLM command carry it as --override-generation-config, which vLLM's parser accepts; the
evaluation cache follows it. (tests/test_eval_vllm.py compares the generations of both engines token by token.)"""
from __future__ import annotations

import pytest
import torch

from eval.evaluate import cache_key
from eval.generate import GrammarMask, cut_at_stop, output_penalties
from flows.segments import as_served
from serving.config import render_vllm_config, validate_with_vllm, write_vllm_config
from workspace.config import ConfigError, load_config
from workspace.model_ref import ModelRef
from workspace.paths import ROOT
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
    decoding = load_config(overrides=["serving.decoding.grammar=null"]).config.serving.decoding
    assert decoding.stop == ["</Screen>"]  # configs/pipeline.yaml: stop at the closing root tag
    assert decoding.request_defaults() == {"stop": ["</Screen>"], "include_stop_str_in_output": True}
    assert decoding.non_default() == {"frequency_penalty": 0.2, "stop": ["</Screen>"], "include_stop_str_in_output": True}
    assert decoding.penalties() == {"frequency_penalty": 0.2}
    assert load_config(overrides=["serving.decoding.stop=[]", "serving.decoding.grammar=null"]
                       ).config.serving.decoding.request_defaults() == {}
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
    loaded = load_config()

    def key(*overrides: str) -> str:  # the served decoding reaches the evaluation through the flows' as_served()
        return cache_key(loaded, model, ("custom",), test, "hf", as_served(load_config(overrides=list(overrides)))["sampling"])

    keys = {key(f"serving.decoding.frequency_penalty={v}") for v in (0, 0.2, 0.3)}
    assert len(keys) == 3
    no_stop = key("serving.decoding.stop=[]")
    assert no_stop not in keys
    no_grammar = key("serving.decoding.grammar=null")
    assert no_grammar not in keys | {no_stop}


# ------------------------------------------------------------------------------------------------ the grammar
def _matcher(grammar: str):
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "base-tiny")
    return GrammarMask.compile(grammar, tok, len(tok)), xgr


def _accepts(compiled, xgr, text: str) -> bool:
    m = xgr.GrammarMatcher(compiled)
    return m.accept_string(text) and m.is_completed()


def test_the_grammar_is_a_request_default_the_request_can_replace():
    decoding = load_config().config.serving.decoding
    text = (ROOT / "configs/grammars/screen.ebnf").read_text()
    assert decoding.grammar == "configs/grammars/screen.ebnf" and decoding.grammar_text == text
    assert decoding.request_defaults()["structured_outputs"] == {"grammar": text}
    assert decoding.non_default()["structured_outputs"] == {"grammar": text}  # the evaluation decodes with it
    assert decoding.defaults_for({"messages": []}) == decoding.request_defaults()
    own_stop = decoding.defaults_for({"stop": ["x"]})  # a request's own stop: the grammar still applies
    assert "stop" not in own_stop and "include_stop_str_in_output" not in own_stop and "structured_outputs" in own_stop
    for own in ({"response_format": {"type": "text"}}, {"structured_outputs": {"regex": "a+"}}, {"guided_json": {}}):
        assert "structured_outputs" not in decoding.defaults_for(own) and "stop" in decoding.defaults_for(own)


def test_a_missing_or_rootless_grammar_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="serving.decoding.grammar.*no file configs/grammars/nope.ebnf"):
        load_config(overrides=["serving.decoding.grammar=configs/grammars/nope.ebnf"])
    rootless = tmp_path / "g.ebnf"
    rootless.write_text('screen ::= "<Screen/>"\n')
    with pytest.raises(ConfigError, match="no `root ::= ...` rule"):
        load_config(overrides=[f"serving.decoding.grammar={rootless}"])
    with pytest.raises(ValueError, match="serving.decoding.grammar does not parse.*bogus"):
        _matcher('root ::= "a" | bogus')


def test_the_shipped_grammar_admits_every_answer_of_the_data_and_no_mismatched_tag():
    """Every reference answer of the shipped train and test data is a complete sentence of the grammar (the grammar
    never forbids what the model was taught), a Korean prose answer is too, and a container closed by another tag
    or an answer that starts as XML and drifts into text is not."""
    import json

    compiled, xgr = _matcher((ROOT / "configs/grammars/screen.ebnf").read_text())
    answers = [json.loads(line)["output"] for name in ("train", "test")
               for line in (ROOT / f"data/raw/screens/{name}.jsonl").read_text().splitlines() if line.strip()]
    assert len(answers) > 1000
    assert all(_accepts(compiled, xgr, a) for a in answers)
    assert _accepts(compiled, xgr, "윤슬재고관리 시스템은 재무시스템팀이 운영합니다. 포트는 9514번입니다.")
    assert not _accepts(compiled, xgr, '<Screen id="a">\n  <Grid id="g">\n    <Column id="c"/>\n  </Form>\n</Screen>')
    assert not _accepts(compiled, xgr, '<Screen id="a">\n  <Button id="b"/> and then some text')
    assert not _accepts(compiled, xgr, "text, then <Screen/>")


def test_the_grammar_mask_leaves_a_row_that_generate_ended_alone():
    """Rows are masked to what the grammar allows next; a row that generate() ended (a stop string: it is padded
    afterwards) is left alone, and a token chosen outside the grammar is an error, never ignored."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "base-tiny")
    compiled, _ = _matcher('root ::= "<Screen/>"')
    vocab = compiled.tokenizer_info.vocab_size
    mask = GrammarMask(compiled, 2, prompt_len=1, pad_token_id=tok.pad_token_id)
    scores = mask(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, vocab))
    allowed = torch.isfinite(scores[0]).nonzero().flatten().tolist()
    assert allowed and all("<Screen/>".startswith(tok.decode([t])) for t in allowed)
    first = allowed[0]
    ids = torch.tensor([[0, first], [0, tok.pad_token_id]])  # row 1 was ended by generate() and padded
    scores = mask(ids, torch.zeros(2, vocab))
    assert torch.isfinite(scores[1]).all() and mask.done == [False, True]
    outside = next(t for t in range(vocab) if t not in allowed and t != tok.pad_token_id)
    with pytest.raises(RuntimeError, match="outside the grammar"):
        GrammarMask(compiled, 1, prompt_len=1, pad_token_id=tok.pad_token_id)(torch.tensor([[0, outside]]),
                                                                              torch.zeros(1, vocab))
