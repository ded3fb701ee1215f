"""The explorer: a local web app over one atlas (and optionally a live model).

    from lmatlas.web import create_app
    app = create_app("smollm2-135m.atlas.duckdb", model=lmatlas.load())   # any ASGI server runs it

``lmatlas serve FILE [--model MODEL] [--diff B]`` runs it with uvicorn on 127.0.0.1.
Everything the app holds lives on the app (``app.state.explorer``), never in module
globals, so several apps can run in one process. Pages and their JSON API:

=========================  ==============================================  =====================
page                       API                                             needs
=========================  ==============================================  =====================
``/``                      ``/api/atlas``, ``/api/heads``, ``/api/layers``,  the atlas
                           ``/api/neurons``
``/head/L5.H3``            ``/api/heads/L5.H3``, ``.../windows``,           the atlas (+ model for
                           ``POST .../attention``                          typed prompts)
``/neuron/L12.N1031``      ``/api/neurons/L12.N1031``,                      the atlas (+ model)
                           ``POST .../activations``
``/search?q=dog``          ``/api/search``                                 the atlas
``/lens``                  ``POST /api/lens``                              a model
``/diff``                  ``/api/diff``                                   ``--diff B``
``/edit?ablate=L5.H3``     ``POST /api/edit``, ``POST /api/edit/file``      a model
``/circuit?task=ioi``      ``/api/circuit``, ``/api/circuit/tasks``         the atlas's ``circuits``
                                                                           table, or a model
=========================  ==============================================  =====================

The OpenAPI schema is at ``/openapi.json`` (docs at ``/docs``).
"""

from lmatlas.web.app import create_app

__all__ = ["create_app"]
