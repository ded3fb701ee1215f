"""The explorer on the packaged SmolLM2-135M: a small real atlas (structure, corpus, head windows,
neuron contexts on a short corpus) and a 2,048-token attention pattern from the live model."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from lmatlas.atlas import build_atlas
from lmatlas.web import create_app
from lmatlas.web.live import decode_lower_triangle

pytestmark = pytest.mark.slow
PARAMS = {"corpus_sequences": 2, "seq_len": 64}


@pytest.fixture(scope="module")
def client(smollm2, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2-web") / "small.atlas.duckdb"
    build_atlas(
        smollm2, path, only=["structure", "corpus", "head_windows", "neuron_contexts"], params=PARAMS, progress=False
    )
    with TestClient(create_app(path, model=smollm2)) as c:
        yield c


def test_grid_and_windows_of_the_real_model(client, smollm2):
    grid = client.get("/api/heads").json()
    assert (grid["layers"], grid["heads"], len(grid["cells"])) == (30, 9, 270)
    assert grid["cells"][13]["kv_group"] == 1  # 9 query heads over 3 KV heads: head 4 of a layer reads group 1
    windows = client.get("/api/heads/L5.H3/windows").json()["windows"]
    assert len(windows) == 2  # one per corpus window
    text = "".join(windows[0]["tokens"])
    assert sum(c.isalpha() for c in text) > len(text) / 3  # real English docstrings, not ids
    neuron = client.get("/api/neurons/L12.N1031").json()
    assert len(neuron["contexts"]) == 5 and sum(neuron["histogram"]["counts"]) == 2 * 64
    assert client.get("/api/heads/L30.H0").status_code == 404 and client.get("/api/neurons/L0.N1536").status_code == 404


def test_attention_on_2048_tokens(client, smollm2):
    from lmatlas.corpus import default_texts

    ids = smollm2.tokenizer(" ".join(default_texts()), add_special_tokens=False)["input_ids"][:2040]
    prompt = smollm2.tokenizer.decode(ids)
    n = smollm2.tokenize(prompt)["input_ids"].shape[1]
    assert 2000 <= n <= 2048
    data = client.post("/api/heads/L5.H3/attention", json={"prompt": prompt}).json()
    assert data["n"] == n == len(data["tokens"])
    pattern = decode_lower_triangle(data["data"], n)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=n / 65535)  # every query's row is a distribution
    direct = (
        smollm2.run(smollm2.tokenize(prompt)["input_ids"], capture=["L5.attn.pattern"], stop_after=5, lm_head=False)
        .pattern(5, 3)[0]
        .float()
        .numpy()
    )
    np.testing.assert_allclose(pattern, direct, atol=1.0 / 65535)
    too_long = client.post("/api/heads/L5.H3/attention", json={"prompt": prompt + prompt})
    assert too_long.status_code == 422 and "at most 2048" in too_long.json()["error"]["message"]
