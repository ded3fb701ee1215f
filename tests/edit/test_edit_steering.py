"""Steering vectors and decoded directions against direct computations."""

from __future__ import annotations

import pytest
import torch

from lmatlas.edit import Add, head_direction, neuron_direction, steering_vector
from lmatlas.errors import EditError


def test_steering_vector_is_the_mean_difference_at_the_last_token(llama):
    positive, negative = ["I love it", "great fun"], ["I hate it", "awful day!"]

    def last(prompt):
        return llama.run(prompt, capture=["L1.resid.post"])["L1.resid.post"][0, -1]

    expected = torch.stack([last(p) for p in positive]).mean(0) - torch.stack([last(p) for p in negative]).mean(0)
    vector = steering_vector(llama, positive, negative, layer=1)
    torch.testing.assert_close(vector, expected)
    steered = llama.run("so so", replace=Add("L1.resid.post", vector, alpha=4.0), capture=["L1.resid.post"])
    plain = llama.run("so so", capture=["L1.resid.post"])
    torch.testing.assert_close(steered["L1.resid.post"], plain["L1.resid.post"] + 4.0 * vector)


def test_steering_needs_two_lists(llama):
    with pytest.raises(EditError, match="non-empty lists"):
        steering_vector(llama, "I love it", ["I hate it"], layer=1)


def test_neuron_direction_is_its_output_row_times_the_post_norm_gain(tiny):
    row = tiny.W.W_out(1)[4].float()
    if tiny.spec.mlp_post_norm:
        norm = tiny.blocks[1].get_submodule(tiny.spec.mlp_post_norm)
        row = row * (1.0 + norm.weight.float() if tiny.spec.norm_kind.value == "rms_offset" else norm.weight.float())
    torch.testing.assert_close(neuron_direction(tiny, "L1.N4"), row)
    assert head_direction(tiny, "L1.H2", 65).shape == (tiny.layout.d_model,)


def test_head_direction_is_the_ov_image_of_the_token(llama):
    from lmatlas.decode.heads import head_inputs

    x = head_inputs(llama, 1, torch.tensor([65]))  # [1, d_model]
    kv = llama.layout.kv_head(2)
    expected = (x @ llama.W.W_V(1)[kv].float()) @ llama.W.W_O(1)[2].float()
    torch.testing.assert_close(head_direction(llama, "L1.H2", 65), expected[0])
