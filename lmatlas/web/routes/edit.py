"""Edit playground API: generate with and without an edit (needs --model), and the edit as a saveable file."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from lmatlas.web import editing
from lmatlas.web.errors import MODEL_RESPONSES
from lmatlas.web.routes import explorer
from lmatlas.web.state import Explorer, clean

router = APIRouter(prefix="/api/edit", tags=["edit"], responses=MODEL_RESPONSES)


@router.post(
    "",
    response_model=editing.EditComparison,
    summary="Plain and edited continuations of a prompt, side by side (needs --model)",
)
def generate(body: editing.EditRequest, ex: Explorer = Depends(explorer)) -> dict:
    model = ex.need_model("The edit playground")
    edit = editing.build_edit(body, ex.layout)
    heads = (
        [
            f"L{row['layer']}.H{row['head']}"
            for row in ex.query(
                "SELECT layer, head FROM head_scores WHERE detector = 'retrieval' ORDER BY score DESC LIMIT 10"
            )
        ]
        if body.strategy == "decore" and ex.has("head_scores")
        else []
    )

    scores = (
        ex.query(
            "SELECT detector, layer, head, score FROM head_scores WHERE detector IN (?, ?)", list(editing.KV_DETECTORS)
        )
        if body.kv_budget is not None and ex.has("head_scores")
        else []
    )

    def work() -> dict:
        n, new = editing.check_request(model, body, ex.limits)  # tokenizes: inside the gate too
        return editing.compare(model, body, edit, n, new, heads, scores)

    return clean(ex.gate.run(work))


@router.post(
    "/file",
    response_model=editing.EditFile,
    summary="The edit as lmatlas saves it (Edit.save / Edit.load), to download (needs --model)",
)
def edit_file(body: editing.EditSpec, ex: Explorer = Depends(explorer)) -> dict:
    model = ex.need_model("Saving an edit")
    edit = editing.build_edit(body, ex.layout)
    return ex.gate.run(lambda: editing.saved(model, edit))
