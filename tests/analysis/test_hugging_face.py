"""Hugging Face transformers built from tiny configs (no download), called as they are called in
training: `model(input_ids=..., attention_mask=..., labels=...)`, the loss read from the output.
Prediction == measurement on this machine. Runs where transformers is installed
(/work/venvs/t2141); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from ninlab.analysis.measure import measure
from ninlab.analysis.predict import predict_memory
from ninlab.analysis.step import StepSpec
from ninlab.analysis.summary import summarize

transformers = pytest.importorskip("transformers")

VOCAB = 100


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    small = {"vocab_size": VOCAB, "max_position_embeddings": 32}
    if name == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=2, n_positions=32, **{"vocab_size": VOCAB}
        )
        return transformers.GPT2LMHeadModel(config)
    if name == "bert":
        config = transformers.BertConfig(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=2,
            intermediate_size=128,
            **small,
        )
        return transformers.BertForSequenceClassification(config)
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        **small,
    )
    return transformers.LlamaForCausalLM(config)


LABELS = {"gpt2": (16,), "bert": (), "llama": (16,)}  # a label per token, or per sequence


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("labels", [True, False])
def test_a_tiny_transformer_called_by_keyword_is_predicted_exactly(name: str, labels: bool):
    model = tiny(name)
    sizes = {"input_ids": (16,), "attention_mask": (16,)}
    if labels:
        sizes["labels"] = LABELS[name]
    spec = StepSpec(input_size=sizes, input_dtype="int64", input_range=(0, 2), optimizer="adam")
    report = predict_memory(model, spec, batch_size=2)
    measured = measure(model, spec, batch_size=2)
    assert measured.live_peak_bytes == report.live_peak_bytes
    assert report.held_peak_bytes == pytest.approx(measured.allocator_peak_bytes, rel=0.01)
    loss = summarize(model, spec, batch_size=2).loss
    assert loss == (
        "the model's own loss (its output's loss)"
        if labels
        else "cross-entropy of the output's logits against class labels"
    )


def test_canary_transformers_skips_the_causal_mask_for_real_and_builds_it_on_fake_tensors():
    """What `ninlab.analysis.hugging_face` corrects, pinned on the installed transformers: its
    `is_tracing` is true for a fake tensor, and a real Llama forward without padding hands SDPA
    no mask (is_causal), so a trace left alone would build one the real run does not."""
    from transformers import masking_utils

    from ninlab.analysis.hugging_face import unreproduced
    from ninlab.analysis.torch_internals import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(2, 4, dtype=torch.long))
    assert masking_utils.is_tracing(fake)
    model = tiny("llama")
    config = model.config
    embeds = torch.zeros(2, 16, 64)
    positions = torch.arange(16).unsqueeze(0)
    assert masking_utils.create_causal_mask(config, embeds, None, None, positions) is None
    assert unreproduced(model) == ()


def test_the_causal_mask_is_predicted_as_the_real_run_decides_it():
    """An all-ones attention mask (`input_range=(1, 2)`): no mask for real, none in the trace;
    with padding, a mask in both."""
    model = tiny("llama")
    for value_range in ((1, 2), (0, 2)):
        spec = StepSpec(
            input_size={"input_ids": (16,), "attention_mask": (16,)},
            input_dtype="int64",
            input_range=((0, VOCAB), value_range),
            mode="infer",
        )
        report = predict_memory(model, spec, batch_size=2)
        measured = measure(model, spec, batch_size=2)
        assert report.live_trust.exact
        assert report.live_peak_bytes == measured.live_peak_bytes
