"""The explorer's circuit page in a browser: granularity, verification, and a head's attention explained."""

from __future__ import annotations

from support.web import open_page


def test_the_circuit_page_names_granularity_and_explains_a_head(page, server):  # noqa: F811
    open_page(page, server, "/circuit?task=induction")
    assert page.locator("#circuit-source").get_attribute("data-granularity") == "edges"
    assert "edge by edge" in page.locator("#circuit-granularity").inner_text()
    assert "Spearman" in page.locator("#circuit-verification").inner_text()
    page.locator("#circuit-svg g.node.head").first.click()
    page.locator("#attention-sources #prompt").fill("abcdefabcde")
    page.locator("#attention-sources #run").click()
    page.wait_for_selector("#attention-sources-summary", timeout=30_000)
    assert "score" in page.locator("#attention-sources-summary").inner_text()
    for side in ("query", "key", "value"):
        assert page.locator(f"table.sources[data-side='{side}'] tr").count() >= 1
    assert page.errors == []


def test_the_head_page_explains_where_the_head_attends(page, server):  # noqa: F811
    """The same explanation on the head page: the query / key / value sides of one head on a typed prompt,
    equal to the library's attention_sources on that prompt."""
    from lmatlas.causal.attention_sources import attention_sources

    open_page(page, server, "/head/L1.H0")
    page.locator("#attention-sources #prompt").fill("abcdefabcde")
    page.locator("#attention-sources #run").click()
    page.wait_for_selector("#attention-sources-summary", timeout=30_000)
    model = server.server.config.app.state.explorer.model
    expected = attention_sources(model, "L1.H0", "abcdefabcde")
    summary = page.locator("#attention-sources-summary").inner_text()
    assert f"query {expected.query_pos} " in summary and f"on key {expected.key_pos} " in summary
    top = expected.top("key", 12)
    rows = page.locator("table.sources[data-side='key'] tr")
    assert rows.count() == len(top) and rows.first.locator("td").first.inner_text() == top[0][0]
    assert page.errors == []
