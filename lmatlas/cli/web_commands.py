"""``lmatlas serve``: the explorer over an atlas, in the browser.

    lmatlas serve FILE [--model MODEL] [--host 127.0.0.1] [--port 8000] [--diff B]

Binds to 127.0.0.1 unless ``--host`` says otherwise (the explorer has no
authentication). ``--model`` attaches a live model (the atlas's own) for the
typed-prompt panes and the logit lens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, app, err, load_model, run


@app.command()
def serve(
    path: Path = typer.Argument(..., help="An atlas file (lmatlas map --out FILE)."),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        help="The atlas's model, for typed prompts and the lens (hub id, directory, .gguf or packaged name).",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port."),
    diff: Optional[Path] = typer.Option(None, "--diff", help="A second atlas of the same architecture to compare."),
    max_tokens: int = typer.Option(2048, "--max-tokens", min=1, help="Longest prompt for the live model."),
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Browse an atlas (and a live model) in the browser."""

    def body():
        try:
            import uvicorn

            from lmatlas.web import create_app
            from lmatlas.web.state import Limits
        except ImportError as missing:
            from lmatlas.errors import LmatlasError

            raise LmatlasError(f"The explorer needs {missing.name}: pip install 'lmatlas[web]'.") from None
        loaded = load_model(model, dtype, device) if model else None
        explorer = create_app(path, model=loaded, diff=diff, limits=Limits(prompt_tokens=max_tokens))
        err.print(f"lmatlas explorer on http://{host}:{port}/ (Ctrl-C to stop)", highlight=False)
        uvicorn.run(explorer, host=host, port=port, log_level="warning")

    run(body)
